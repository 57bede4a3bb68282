"""Pluggable text generators for the synthetic-data transforms (``wrap``, ``continuation``).

One interface, ``generate(prompts: list[str]) -> list[str]`` (one output per input, same order),
and a small closed registry, ``GENERATORS``:

- ``restyle``: a deterministic rule-based restyler. It is a stand-in that exercises the
  plumbing on a CPU; it does not paraphrase. ``qa`` turns each sentence into a
  ``Question: ... / Answer: ...`` pair (a yes/no question by subject-auxiliary inversion where
  the sentence has an auxiliary verb, else a "what does the passage say about ..." question),
  ``wikipedia`` strips markup and normalises whitespace into plain declarative paragraphs,
  ``simple`` drops parentheticals and splits long sentences at clause boundaries; ``verbatim``
  returns the text unchanged (the control: exact duplication instead of a rephrasing).
- ``model``: a causal LM from the select stage's ``reference`` inputs, decoded with HF
  ``generate`` (greedy, or sampling seeded per batch). The papers' results need a large
  instruction-tuned generator (WRAP: Mistral-7B-Instruct; non-instructional FT: GPT-3.5/4);
  a model this project trains on CPU only exercises the plumbing too.

Follows WRAP (Maini et al. 2024, arXiv 2401.16380): the four styles (easy = ``simple``,
medium = ``wikipedia``, ``hard``, ``qa``) and their prompts under a Vicuna-style system line.
The easy and hard instructions are as quoted by secondary sources of the paper's appendix; the
medium and Q/A instructions are reconstructed from the paper's wording ("as in sentences on
Wikipedia", "'Question:' followed by 'Answer:'") and are unverified word for word, as is the
exact joining of system line, instruction and text. The ``continue`` style (the text alone, for
a base LM to continue) serves non-instructional fine-tuning (Xie et al. 2024), whose prompt to
GPT-3.5/4 is not published with code: guessed. Sentence splitting is a regular expression (the
paper uses NLTK's splitter).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from components.data.lm_scoring import left_padded
from components.data.selector import SelectionContext, SelectionError, pick_reference
from components.registry import Method, MethodParams, Paper, Registry

WRAP_PAPER = Paper(title="Rephrasing the Web: A Recipe for Compute and Data-Efficient Language Modeling",
                   url="https://arxiv.org/abs/2401.16380", arxiv="2401.16380")

WRAP_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the questions.")
WRAP_INSTRUCTIONS = {
    "simple": "For the following paragraph give me a paraphrase of the same using a very small vocabulary "
              "and extremely simple sentences that a toddler will understand:",
    "wikipedia": "For the following paragraph give me a diverse paraphrase of the same in high quality "
                 "English language as in sentences on Wikipedia:",
    "hard": "For the following paragraph give me a paraphrase of the same using very terse and abstruse "
            "language that only an erudite scholar will understand. Replace simple words and phrases "
            "with rare and complex ones:",
    "qa": 'Convert the following paragraph into a conversational format with multiple tags of "Question:" '
          'followed by "Answer:":',
}
#: prompt template per style; ``{text}`` is replaced by the source text
PROMPT_TEMPLATES = {style: f"{WRAP_SYSTEM} USER: {instruction}\n\n{{text}}\nASSISTANT:"
                    for style, instruction in WRAP_INSTRUCTIONS.items()}
PROMPT_TEMPLATES["continue"] = "{text}"
STYLES = tuple(PROMPT_TEMPLATES)


class GenerationError(SelectionError):
    """A generator cannot run as configured, or produced unusable output."""


_BOUNDARY = re.compile(r"\n\s*\n|(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_PARAGRAPH = re.compile(r"\n\s*\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text`` (a regex splitter: a sentence
    ends at . ! or ? before whitespace and a capital or digit, and at every blank line)."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if text[start:match.start()].strip():
            spans.append((start, match.start()))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, whitespace-normalised."""
    return [" ".join(text[a:b].split()) for a, b in sentence_spans(text)]


# ---- the rule-based restyler ---------------------------------------------------------------

_MARKUP = [
    (re.compile(r"<[^>\n]{1,200}>"), " "),  # html/xml tags
    (re.compile(r"```+|`+"), ""),  # code fences and inline code marks
    (re.compile(r"^\s{0,3}#{1,6}\s*", re.M), ""),  # markdown headings / comment marks
    (re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+", re.M), ""),  # list bullets
    (re.compile(r"^\s*[=\-~^*#]{3,}\s*$", re.M), ""),  # rst/markdown underlines and rules
    (re.compile(r"\*\*|__|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)"), ""),  # emphasis marks
    (re.compile(r"\[([^\]\n]+)\]\([^)\n]*\)"), r"\1"),  # markdown links -> their text
    (re.compile(r":(?:[a-z]+:)+(?=`|\w)"), ""),  # rst roles such as :func:
    (re.compile(r"::(?=\s|$)"), ":"),  # rst literal-block markers
]
_AUXILIARIES = frozenset({"is", "are", "was", "were", "can", "could", "will", "would", "should", "must",
                          "may", "might", "has", "have", "had", "does", "do", "did"})
_LOWERCASE_OPENERS = frozenset({"the", "a", "an", "this", "that", "these", "those", "it", "they", "each",
                                "every", "some", "all", "its", "their", "there", "we", "you"})
_CLAUSE_BREAK = re.compile(r"\s*;\s*|:\s+|,\s+(?=(?:and|but|so|which|while|because|although|whereas)\b)")
_PARENTHETICAL = re.compile(r"\s*\([^()]{0,200}\)")
SIMPLE_MAX_WORDS = 12  # a clause longer than this is cut at the word limit


def _declarative(sentence: str) -> str:
    sentence = sentence.strip().rstrip(",;:")
    if not sentence:
        return ""
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if sentence[-1] in ".!?" else sentence + "."


def restyle_wikipedia(text: str) -> str:
    """Markup stripped, whitespace normalised, paragraphs of complete declarative sentences."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    paragraphs = []
    for paragraph in _PARAGRAPH.split(text):
        sentences = [_declarative(s) for s in split_sentences(paragraph)]
        sentences = [s for s in sentences if any(c.isalnum() for c in s)]
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def restyle_simple(text: str) -> str:
    """Parentheticals dropped; sentences split at clause boundaries and cut to a few words."""
    out = []
    for sentence in split_sentences(restyle_wikipedia(text)):
        sentence = _PARENTHETICAL.sub("", sentence)
        for clause in _CLAUSE_BREAK.split(sentence.rstrip(".!?")):
            words = clause.split()
            if words and words[0].lower() in {"and", "but", "so", "which", "while", "because", "although", "whereas"}:
                words = words[1:]
            if any(any(c.isalnum() for c in w) for w in words):
                out.append(_declarative(" ".join(words[:SIMPLE_MAX_WORDS])))
    return " ".join(out)


def _question(sentence: str) -> tuple[str, str]:
    """(question, answer) for one declarative sentence."""
    body = sentence.rstrip(".!?")
    words = body.split()
    for k, word in enumerate(words[1:8], start=1):  # the subject is short: look for the verb early
        if word.lower() in _AUXILIARIES:
            if words[0].lower() in _LOWERCASE_OPENERS:  # not a name: lower-case it after the verb
                words[0] = words[0].lower()
            subject = " ".join(words[:k])
            rest = " ".join(words[k + 1:])
            question = f"{word.capitalize()} {subject}{' ' + rest if rest else ''}?"
            return question, f"Yes. {_declarative(sentence)}"
    topic = " ".join(words[:6])
    return f"What does the passage say about {topic}?", _declarative(sentence)


def restyle_qa(text: str) -> str:
    """Each sentence becomes a ``Question: ...`` line and an ``Answer: ...`` line."""
    pairs = []
    for sentence in split_sentences(restyle_wikipedia(text)):
        question, answer = _question(sentence)
        pairs.append(f"Question: {question}\nAnswer: {answer}")
    return "\n\n".join(pairs)


def restyle_verbatim(text: str) -> str:
    """The text unchanged: WRAP's control. Real data plus an exact copy of each chunk adds the
    same tokens as a rephrasing, so a rephrasing must beat mere repetition to count."""
    return text


RESTYLERS = {"qa": restyle_qa, "wikipedia": restyle_wikipedia, "simple": restyle_simple, "verbatim": restyle_verbatim}


# ---- params, base class, registry ----------------------------------------------------------

class GenerationParams(MethodParams):
    """Which generator rewrites text, in which style, and how the ``model`` generator decodes."""

    generator: str = Field("restyle", description="text generator: 'restyle' (rule-based stand-in) or 'model' "
                                                  "(a `reference` causal LM)")
    style: str = Field("wikipedia", description=f"rewriting style, one of {', '.join(STYLES)}")
    reference: str | None = Field(None, min_length=1, description="`reference` input stage the model generator "
                                                                  "uses (default: the first)")
    max_new_tokens: int = Field(256, ge=1, description="model generator: tokens generated per prompt")
    max_input_tokens: int = Field(384, ge=1, description="model generator: source-text tokens kept per prompt")
    do_sample: bool = Field(False, description="model generator: sample (seeded) instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, description="model generator: sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="model generator: nucleus sampling mass")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    prompt_template: str | None = Field(None, description="override of the style's prompt; must contain {text}")
    seed: int = Field(0, ge=0, description="seeds sampling and every random choice of the method")

    @field_validator("prompt_template")
    @classmethod
    def _has_text(cls, value):
        if value is not None and "{text}" not in value:
            raise ValueError(f"prompt_template must contain '{{text}}', got {value!r}")
        return value

    @model_validator(mode="after")
    def _known_generator_and_style(self):
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown generator {self.generator!r}; registered generators: "
                             f"{', '.join(GENERATORS.keys())}")
        supported = GENERATORS.get(self.generator).styles
        if self.style not in supported:
            raise ValueError(f"generator {self.generator!r} has no style {self.style!r}; "
                             f"its styles: {', '.join(supported)}")
        return self


class TextGenerator(Method):
    """Rewrites or continues texts: ``generate(prompts)`` returns one string per prompt.

    ``stats`` counts what the last calls did (e.g. truncated prompts) for logging.
    """

    Params = GenerationParams
    styles: tuple[str, ...] = ()

    def __init__(self, params: GenerationParams | None = None, context: SelectionContext | None = None):
        super().__init__(params)
        if self.params.style not in self.styles:
            raise GenerationError(f"generator {self.key!r} has no style {self.params.style!r}; "
                                  f"its styles: {', '.join(self.styles)}")
        self.context = context
        self.stats: dict = {}

    def generate(self, prompts: Sequence[str]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must implement generate()")

    def _bar(self, n_prompts: int):
        progress = bool(self.context and self.context.progress)
        return tqdm(total=n_prompts, desc=f"generate ({self.key}:{self.params.style})", unit="prompt",
                    disable=not progress)


class RestyleGenerator(TextGenerator):
    """Deterministic rule-based restyling: a plumbing stand-in, not a paraphraser."""

    key = "restyle"
    paper = WRAP_PAPER
    styles = tuple(RESTYLERS)

    def generate(self, prompts: Sequence[str]) -> list[str]:
        restyle = RESTYLERS[self.params.style]
        out: list[str] = []
        bar = self._bar(len(prompts))
        for start in range(0, len(prompts), self.params.batch_size):
            batch = prompts[start:start + self.params.batch_size]
            out.extend(restyle(p) for p in batch)
            bar.update(len(batch))
        bar.close()
        return out


class ModelGenerator(TextGenerator):
    """A `reference` causal LM decoded with HF ``generate`` under the style's prompt template."""

    key = "model"
    paper = WRAP_PAPER
    styles = STYLES

    def __init__(self, params: GenerationParams | None = None, context: SelectionContext | None = None):
        super().__init__(params, context)
        self.reference = pick_reference(context, self.params.reference, "the `model` generator")
        self.model = self.reference.model
        self.tokenizer = context.tokenizer
        if self.tokenizer is None:
            raise GenerationError(f"{context.stage}: the `model` generator needs the `tokenizer` input "
                                  f"(the reference model's tokenizer)")
        if self.tokenizer.eos_token_id is None:
            raise GenerationError(f"{context.stage}: the tokenizer has no eos_token (generation stops and pads on it)")
        self.template = self.params.prompt_template or PROMPT_TEMPLATES[self.params.style]
        head, _, tail = self.template.partition("{text}")
        encode = self.tokenizer.backend_tokenizer.encode_batch
        self._head, self._tail = (e.ids for e in encode([head, tail], add_special_tokens=False))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        room = (limit - self.params.max_new_tokens - len(self._head) - len(self._tail)) if limit else None
        if room is not None and room < 1:
            raise GenerationError(
                f"{context.stage}: the reference model's context ({limit} positions) has no room for source text: "
                f"prompt template {len(self._head) + len(self._tail)} tokens + max_new_tokens="
                f"{self.params.max_new_tokens}; lower max_new_tokens or set a shorter prompt_template")
        self._text_budget = min(self.params.max_input_tokens, room) if room is not None else self.params.max_input_tokens

    def prompt_ids(self, text: str) -> list[int]:
        """Template tokens around the source text's tokens, the text cut to the token budget
        (its end kept for ``continue``, which extends the text; its start otherwise)."""
        ids = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) > self._text_budget:
            self.stats["truncated_prompts"] = self.stats.get("truncated_prompts", 0) + 1
            ids = ids[-self._text_budget:] if self.params.style == "continue" else ids[:self._text_budget]
        return self._head + ids + self._tail

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        params, model, tokenizer = self.params, self.model, self.tokenizer
        pad = tokenizer.eos_token_id
        ids = [self.prompt_ids(p) for p in prompts]
        if any(not x for x in ids):
            raise GenerationError(f"{self.context.stage}: an empty prompt (no tokens) cannot be continued")
        out = [""] * len(ids)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths: less padding
        model.eval()
        device = next(model.parameters()).device
        bar = self._bar(len(ids))
        for batch_index, start in enumerate(range(0, len(order), params.batch_size)):
            chunk = order[start:start + params.batch_size]
            input_ids, mask = left_padded([ids[i] for i in chunk], pad)
            width = input_ids.shape[1]
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=pad,
                          do_sample=params.do_sample)
            if params.do_sample:
                kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            # a private RNG stream per batch: reruns reproduce, the global torch RNG is untouched
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(np.random.SeedSequence([params.seed % 2**32, batch_index])
                                      .generate_state(1)[0]))
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row, i in enumerate(chunk):
                new = generated[row, width:].tolist()
                if pad in new:
                    new = new[:new.index(pad)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.update(len(chunk))
        bar.close()
        return out


GENERATORS = Registry("generator", TextGenerator, [RestyleGenerator, ModelGenerator])


def make_generator(params: GenerationParams, context: SelectionContext | None) -> TextGenerator:
    """The generator ``params.generator`` names, bound to the stage's models and tokenizer."""
    return GENERATORS.get(params.generator)(params, context)
