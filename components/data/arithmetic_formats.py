"""Addition data in the formats of "Teaching Arithmetic to Small Transformers" (Lee et al. 2023).

Follows the reference code (``lee-ny/teaching_arithmetic``, ``main_utils.py``:
``generate_data_str`` and ``get_algo_reasoning_str``), character for character:

- ``plain``: ``128+367=495``; prompt ``128+367=``.
- ``reversed``: the answer's digits least-significant first between ``$`` delimiters,
  ``$128+367=594$``; prompt ``$128+367=`` (the code's ``reverse`` format; the ``$`` tells the
  model where an example starts and ends).
- ``scratchpad_simple``: ``Input:\\n128+367\\nTarget:\\n`` then one ``A->digit , C->carry`` line per
  digit from the right, the last ending in ``.``, then the answer (``simple=True``).
- ``scratchpad_detailed``: the same prompt, then ``<scratch>`` with the operands as digit lists,
  one line per digit (``[1,2,8] + [3,6,7] , A=[] , C=0 , 8+7+0=15 , A->5 , C->1``), an ``END``
  line, ``</scratch>`` and the answer's digits separated by spaces.

Examples of one document are joined by ``\\n`` as in the code's text stream. Guessed here (not
checked against the paper's data files): operands have 1..max_digits digits, equally likely (the
paper balances digit counts; its balancing of carry counts is not implemented), and every
problem, counted without order (``a+b`` and ``b+a`` are one problem), appears at most once in a
source, so any document split keeps held-out problems out of training.

``parse_answer`` reads the first example of a text back into ``(a, b, answer)`` the way the
reference evaluator does (the line after ``</scratch>`` or after the simplified scratchpad's
``.``; the reversed answer up to ``$``), but strictly: the answer must be written canonically
(digits only, no leading zero), else it is ``None``.
"""
from __future__ import annotations

import re
from typing import Literal, NamedTuple

import numpy as np
from pydantic import Field

from components.registry import MethodParams, Paper

PAPER = Paper(
    title="Teaching Arithmetic to Small Transformers",
    url="https://arxiv.org/abs/2307.03381",
    arxiv="2307.03381",
)

FORMATS = ("plain", "reversed", "scratchpad_simple", "scratchpad_detailed")
ArithmeticFormat = Literal["plain", "reversed", "scratchpad_simple", "scratchpad_detailed"]

# Target side (answer / chain of thought) in running text, for Masked Thought: see target_spans.
_SCRATCH_PROMPT = re.compile(r"Input:\n\d+\+\d+\nTarget:\n")
_NEXT_EXAMPLE = "\nInput:\n"
_SCRATCH_MARK = re.compile(r"A->\d , C->\d|</?scratch>|\] has \d+ digits\.|A=\[[\d,]*\]|C->\d\.\n\d")
_TARGET_TAIL = re.compile(r"(?:T?a?r?g?e?t?:)?\n(?=<scratch>\n|A->)")  # end of a prompt cut at the start
_ANSWER = re.compile(r"(?:\A\$?\d*\+?\d*|\d\+\d*)=([^\n]*)")


class ArithmeticFormatError(ValueError):
    """A text is not an example of the named arithmetic format."""


class ParsedAnswer(NamedTuple):
    a: int
    b: int
    answer: int | None  # None: the answer is missing or not written canonically


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ArithmeticFormatError(f"unknown arithmetic format {fmt!r}; known formats: {', '.join(FORMATS)}")


def _check_operands(a: int, b: int) -> None:
    if isinstance(a, bool) or isinstance(b, bool) or int(a) != a or int(b) != b or a < 0 or b < 0:
        raise ArithmeticFormatError(f"operands must be non-negative integers, got a={a!r}, b={b!r}")


def _digit_list(digits: list[int]) -> str:
    return "[" + ",".join(str(d) for d in digits) + "]"  # the code's str(list) without spaces


def format_prompt(fmt: str, a: int, b: int) -> str:
    """What the model is given at test time (the code's ``train=False`` strings, without ``\\n``)."""
    _check_format(fmt)
    _check_operands(a, b)
    if fmt == "plain":
        return f"{a}+{b}="
    if fmt == "reversed":
        return f"${a}+{b}="
    return f"Input:\n{a}+{b}\nTarget:\n"


def format_completion(fmt: str, a: int, b: int) -> str:
    """What follows the prompt in a training example (no trailing newline)."""
    _check_format(fmt)
    _check_operands(a, b)
    total = a + b
    if fmt == "plain":
        return str(total)
    if fmt == "reversed":
        return f"{str(total)[::-1]}$"
    xs, ys = [int(d) for d in str(a)], [int(d) for d in str(b)]
    lines: list[str] = []
    if fmt == "scratchpad_detailed":
        lines += ["<scratch>", f"{_digit_list(xs)} has {len(xs)} digits.", f"{_digit_list(ys)} has {len(ys)} digits."]
    carry, result = 0, []
    for _ in range(max(len(xs), len(ys))):
        x = xs[-1] if xs else 0
        y = ys[-1] if ys else 0
        s = x + y + carry
        if fmt == "scratchpad_simple":
            lines.append(f"A->{s % 10} , C->{s // 10}")
        else:
            lines.append(f"{_digit_list(xs)} + {_digit_list(ys)} , A={_digit_list(result)} , C={carry} , "
                         f"{x}+{y}+{carry}={s} , A->{s % 10} , C->{s // 10}")
        result.insert(0, s % 10)
        carry = s // 10
        xs, ys = xs[:-1], ys[:-1]
    if fmt == "scratchpad_detailed":
        lines += [f"{_digit_list(xs)} + {_digit_list(ys)} , A={_digit_list(result)} C={carry} , END", "</scratch>"]
    if carry:
        result.insert(0, carry)
    if fmt == "scratchpad_simple":
        lines[-1] += "."
        lines.append("".join(str(d) for d in result))
    else:
        lines.append(" ".join(str(d) for d in result))
    return "\n".join(lines)


def format_example(fmt: str, a: int, b: int) -> str:
    """One complete training example: prompt + completion."""
    return format_prompt(fmt, a, b) + format_completion(fmt, a, b)


def solution_steps(fmt: str, a: int, b: int) -> list[str]:
    """The steps of the one correct completion, in order; they join to ``format_completion``.

    A step is the smallest piece whose correctness is decided by the computation so far: a line
    (with its newline) of a scratchpad, one answer digit (least significant first) of the
    reversed format, and the whole answer of the plain one, whose first digit needs every carry.
    """
    completion = format_completion(fmt, a, b)
    if fmt == "plain":
        return [completion]
    if fmt == "reversed":
        return list(completion)
    return completion.splitlines(keepends=True)


def verified_prefix(fmt: str, a: int, b: int, completion: str) -> tuple[int, bool]:
    """(steps, complete) of a generated ``completion`` of ``a+b``: how many of its leading steps
    are the correct ones, and whether it is the whole correct solution (then followed by nothing,
    or by a newline: the next example).

    Every step's text fixes the computation's state after it (digits so far, carry), so a step
    that equals the correct one is a correct state: the partial-correctness test of Ni et al.
    (2023), which matches execution states against known-correct programs.
    """
    steps = solution_steps(fmt, a, b)
    solution = "".join(steps)
    if completion == solution or completion.startswith(solution + "\n"):
        return len(steps), True
    done, position = 0, 0
    for step in steps[:-1]:  # the last step ends the solution: it is only right when complete
        if not completion.startswith(step, position):
            break
        done, position = done + 1, position + len(step)
    return done, False


_PROMPT_RE = {
    "plain": re.compile(r"(\d+)\+(\d+)="),
    "reversed": re.compile(r"\$(\d+)\+(\d+)="),
    "scratchpad_simple": re.compile(r"Input:\n(\d+)\+(\d+)\nTarget:\n"),
    "scratchpad_detailed": re.compile(r"Input:\n(\d+)\+(\d+)\nTarget:\n"),
}
_CANONICAL = re.compile(r"0|[1-9]\d*")


def _canonical_int(text: str) -> int | None:
    return int(text) if _CANONICAL.fullmatch(text) else None


def find_prompts(fmt: str, text: str) -> set[tuple[int, int]]:
    """The ``(a, b)`` of every ``fmt`` prompt found whole in ``text``, a decoded training block
    that may start or end mid-example: a match at the very start may be a cut-off piece and is
    skipped, and a plain prompt must follow a newline or a token boundary mark (``>``)."""
    _check_format(fmt)
    return {(int(m.group(1)), int(m.group(2))) for m in _PROMPT_RE[fmt].finditer(text)
            if m.start() > 0 and (fmt != "plain" or text[m.start() - 1] in "\n>")}


def parse_answer(fmt: str, text: str) -> ParsedAnswer:
    """``(a, b, answer)`` of the first example in ``text`` (a prompt plus what followed it).

    Raises ``ArithmeticFormatError`` when ``text`` does not start with the format's prompt;
    ``answer`` is None when the final answer is missing or not canonical (``0495``, ``4 95``).
    """
    _check_format(fmt)
    match = _PROMPT_RE[fmt].match(text)
    if match is None:
        raise ArithmeticFormatError(f"text does not start with a {fmt} prompt: {text[:60]!r}")
    a, b = int(match.group(1)), int(match.group(2))
    rest = text[match.end():]
    if fmt == "plain":
        return ParsedAnswer(a, b, _canonical_int(rest.split("\n", 1)[0]))
    if fmt == "reversed":
        written = re.split(r"[$\n]", rest, maxsplit=1)[0]
        return ParsedAnswer(a, b, _canonical_int(written[::-1]) if written.isdigit() else None)
    rest = rest.split("\nInput:", 1)[0]  # only this example's target
    marker = "</scratch>\n" if fmt == "scratchpad_detailed" else ".\n"
    if marker not in rest:
        return ParsedAnswer(a, b, None)
    line = rest.split(marker, 1)[1].split("\n", 1)[0]
    if fmt == "scratchpad_detailed":
        if not re.fullmatch(r"\d( \d)*", line):
            return ParsedAnswer(a, b, None)
        line = line.replace(" ", "")
    return ParsedAnswer(a, b, _canonical_int(line))


def parse_example(fmt: str, text: str) -> tuple[int, int]:
    """``(a, b)`` of a complete example; it must equal ``format_example(fmt, a, b)`` exactly."""
    a, b, _ = parse_answer(fmt, text)
    if text != format_example(fmt, a, b):
        raise ArithmeticFormatError(f"not a well-formed {fmt} example of {a}+{b}: {text[:80]!r}")
    return a, b


def split_examples(fmt: str, text: str) -> list[str]:
    """The examples of one document (they are joined by newlines)."""
    _check_format(fmt)
    if fmt in ("plain", "reversed"):
        return text.split("\n")
    return re.split(r"\n(?=Input:\n)", text)


def detect_format(text: str) -> str | None:
    """The format of a document, or None when it is none of them."""
    if text.startswith("Input:\n"):
        return "scratchpad_detailed" if "<scratch>" in text else "scratchpad_simple"
    if text.startswith("$"):
        return "reversed"
    return "plain" if _PROMPT_RE["plain"].match(text) else None


def target_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that are the target side (completion) of an example.

    ``text`` is running text between document boundaries that may start or end anywhere inside
    an example (a packed block): a scratchpad runs from its prompt's ``Target:\\n`` to the
    newline before the next ``Input:``; a leading piece of a scratchpad (recognized by its
    ``A->d , C->d`` steps or ``<scratch>`` tags) counts from the start of the text; a plain or
    reversed answer runs from the ``=`` after ``a+b`` to the line end. Prompt characters are
    never included; a few target characters right at a cut (``0.\\n495``) may be missed.
    """
    spans: list[tuple[int, int]] = []

    def scratch_until(start: int) -> int:
        end = text.find(_NEXT_EXAMPLE, start)
        if end >= 0:
            return end
        for k in range(len(_NEXT_EXAMPLE) - 1, 0, -1):  # the next example may be cut off: "...\nInp"
            if text.endswith(_NEXT_EXAMPLE[:k]):
                return max(start, len(text) - k)
        return len(text)

    prompts = list(_SCRATCH_PROMPT.finditer(text))
    lead_end = prompts[0].start() if prompts else len(text)
    lead = text[:lead_end]
    cut = lead.find("Target:\n")
    if cut >= 0:  # the text starts inside a scratchpad prompt
        spans.append((cut + len("Target:\n"), scratch_until(cut)))
    elif _SCRATCH_MARK.search(lead):  # the text starts inside a scratchpad
        tail = _TARGET_TAIL.match(lead)
        spans.append((tail.end() if tail else 0, scratch_until(0)))
    spans += [(m.end(), scratch_until(m.end())) for m in prompts]
    scratch = [(a, b) for a, b in spans]
    for match in _ANSWER.finditer(text):
        a, b = match.span(1)
        if not any(s <= a < e or s < b <= e for s, e in scratch) and not any(
                p.start() <= a < p.end() for p in prompts):
            spans.append((a, b))
    return sorted((a, b) for a, b in spans if b > a)


# ----------------------------------------------------------------------------- the corpus source


class ArithmeticFormattedSource(MethodParams):
    """n-digit addition problems in one of the Lee et al. (2023) formats; problems never repeat."""

    type: Literal["arithmetic_formatted"] = "arithmetic_formatted"
    format: ArithmeticFormat = Field("plain", description="plain | reversed | scratchpad_simple | scratchpad_detailed")
    n_docs: int = Field(2000, ge=1, description="documents")
    examples_per_doc: int = Field(1, ge=1, description="problems per document, joined by newlines")
    max_digits: int = Field(3, ge=1, le=12, description="operands have 1..max_digits digits, equally likely")
    seed: int = Field(0, ge=0, description="mixed with the corpus seed")
    domain: str = Field("arithmetic", min_length=1)


_MAX_DRAW_ROUNDS = 50


def _operands(rng: np.random.Generator, n: int, max_digits: int) -> np.ndarray:
    digits = rng.integers(1, max_digits + 1, size=n)
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    return rng.integers(low, 10**digits)


def unique_problems(rng: np.random.Generator, n: int, max_digits: int) -> list[tuple[int, int]]:
    """``n`` addition problems, no two the same up to operand order, digit counts balanced."""
    capacity = (10**max_digits) * (10**max_digits + 1) // 2
    if n > capacity // 2:  # rejection sampling would crawl; the set is too small anyway
        raise ValueError(
            f"{n} distinct problems requested but {max_digits}-digit addition has only {capacity} "
            f"(unordered); lower n_docs * examples_per_doc below {capacity // 2} or raise max_digits")
    seen: set[tuple[int, int]] = set()
    problems: list[tuple[int, int]] = []
    for _round in range(_MAX_DRAW_ROUNDS):
        need = n - len(problems)
        if need == 0:
            break
        batch = max(2 * need, 64)
        for a, b in zip(_operands(rng, batch, max_digits).tolist(), _operands(rng, batch, max_digits).tolist()):
            key = (a, b) if a <= b else (b, a)
            if key not in seen:
                seen.add(key)
                problems.append((a, b))
                if len(problems) == n:
                    break
    if len(problems) < n:  # digit balancing over-draws the few 1-digit problems
        raise ValueError(f"could only draw {len(problems)} of {n} distinct {max_digits}-digit problems; "
                         f"lower n_docs * examples_per_doc or raise max_digits")
    return problems


def formatted_arithmetic_docs(src: ArithmeticFormattedSource, rng: np.random.Generator | None = None) -> list[str]:
    """The source's documents; ``rng`` defaults to one seeded by ``src.seed``."""
    rng = rng if rng is not None else np.random.default_rng(src.seed)
    problems = unique_problems(rng, src.n_docs * src.examples_per_doc, src.max_digits)
    k = src.examples_per_doc
    return ["\n".join(format_example(src.format, a, b) for a, b in problems[i:i + k])
            for i in range(0, len(problems), k)]
