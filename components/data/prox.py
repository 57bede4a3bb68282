"""ProX: refine every document by executing a small program written for it (Zhou et al. 2024,
"Programming Every Example", arXiv 2409.17115; reference code GAIR-NLP/ProX).

A program is plain text, one function call per line:

- document level: ``drop_doc()`` / ``keep_doc()``;
- chunk level, over the document's lines numbered from 0 (the refining model sees them as
  ``[000]first line``): ``remove_lines(line_start=a, line_end=b)`` (inclusive),
  ``normalize(source_str="...", target_str="...")`` (replace every occurrence) and ``skip()``
  (nothing to do; the reference executor ignores it like any line that is not a known call).

Follows the reference code (``utils/doc_utils.py``, ``utils/chunk_utils.py`` and
``data_gen/tasks/apply_chunk_refining.py``):

- 0-based inclusive line ranges; all ``normalize`` calls run first, in program order, over the
  whole text, then lines are removed by their index in the normalized text; a ``normalize``
  whose source is ``""`` or ``" "`` changes nothing; ``remove_lines(all=True)`` removes every line;
  lines naming no known function are ignored, as the reference ignores them;
- a failed call counts as an error: a line that starts with a known function but does not parse,
  wrong or missing arguments, and (counted on the merged ranges, as the reference counts them) a
  range starting past the last line, or ending past it (then clipped);
- the guards of ``execute_meta_operations`` with its defaults (``threshold_1=0.0``,
  ``threshold_2=0.95``, ``error_op=2``), in its order: if at most 5% of the words are left and
  fewer than 2 calls failed, drop the document; else if at most 10 words are left (a FineWeb
  rule), drop it; else if fewer than 2 calls failed, keep the refined text; else keep the
  original text.

Deviations, on purpose: calls are parsed with Python's ``ast`` (never evaluated), so quoted
commas and single quotes work; arguments must be the documented keywords; a document is dropped
by a parsed ``drop_doc()`` call, not by the substring "drop" anywhere in the output (the
reference's test); ``remove_lines`` with ``line_start > line_end`` or a negative number, and a
``normalize`` whose strings contain a newline (it would renumber the lines), are failures.

Programs come from a program source (``components/data/prox_programs.py``): ``rule_based``
(default; simple detectors, no model) or ``model`` (a reference LM generates programs). The
paper's refiners are 0.3B+ LMs fine-tuned on programs distilled from a large LLM; a tiny
pipeline model writes garbage, which the executor then mostly ignores. The executor itself is
cheap and deterministic.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm.auto import tqdm

from components.data.prox_programs import ModelSourceParams, RuleBasedParams, program_source
from components.data.selector import DocumentTransform, SelectionContext, apply_domains
from components.registry import MethodParams, Paper

DOC_OPS = ("drop_doc", "keep_doc")
CHUNK_OPS = ("remove_lines", "normalize", "skip")
KNOWN_OPS = DOC_OPS + CHUNK_OPS
_LEADING_NAME = re.compile(r"\s*([A-Za-z_]\w*)")


class ProgramError(ValueError):
    """One program line cannot be parsed or applied (counted, never raised out of the executor)."""


@dataclass(frozen=True)
class Call:
    name: str
    kwargs: dict


@dataclass
class ParsedProgram:
    calls: list[Call] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one message per failed line
    ignored_lines: int = 0  # non-blank lines naming no known function


def _literal(node: ast.expr, name: str, kind: type):
    if not isinstance(node, ast.Constant) or type(node.value) is not kind:
        raise ProgramError(f"{name} must be a {kind.__name__} literal, got {ast.unparse(node)}")
    return node.value


def parse_call(line: str) -> Call | None:
    """One program line as a ``Call``; None for a line that names no known function.

    Raises ProgramError for a line that starts with a known function but is malformed.
    """
    head = _LEADING_NAME.match(line)
    if head is None or head.group(1) not in KNOWN_OPS:
        return None
    name = head.group(1)
    try:
        tree = ast.parse(line.strip(), mode="eval").body
    except SyntaxError as err:
        raise ProgramError(f"{line.strip()!r}: not a call ({err.msg})") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == name):
        raise ProgramError(f"{line.strip()!r}: expected a single call {name}(...)")
    if tree.args:
        raise ProgramError(f"{line.strip()!r}: arguments must be keywords")
    given = {}
    for kw in tree.keywords:
        if kw.arg is None or kw.arg in given:
            raise ProgramError(f"{line.strip()!r}: bad or repeated keyword")
        given[kw.arg] = kw.value
    if name in ("drop_doc", "keep_doc", "skip"):
        if given:
            raise ProgramError(f"{line.strip()!r}: {name}() takes no arguments")
        return Call(name, {})
    if name == "remove_lines":
        if set(given) == {"all"}:
            if _literal(given["all"], "all", bool) is not True:
                raise ProgramError(f"{line.strip()!r}: all must be True")
            return Call(name, {"all": True})
        if set(given) != {"line_start", "line_end"}:
            raise ProgramError(f"{line.strip()!r}: remove_lines needs line_start= and line_end=")
        start = _literal(given["line_start"], "line_start", int)
        end = _literal(given["line_end"], "line_end", int)
        if start < 0 or start > end:
            raise ProgramError(f"{line.strip()!r}: need 0 <= line_start <= line_end")
        return Call(name, {"line_start": start, "line_end": end})
    # normalize: target_str may be omitted (= remove source_str), as in the reference
    if "source_str" not in given or not set(given) <= {"source_str", "target_str"}:
        raise ProgramError(f"{line.strip()!r}: normalize needs source_str= (and optionally target_str=)")
    source = _literal(given["source_str"], "source_str", str)
    target = _literal(given["target_str"], "target_str", str) if "target_str" in given else ""
    if "\n" in source or "\n" in target:
        raise ProgramError(f"{line.strip()!r}: normalize strings may not contain a newline")
    return Call(name, {"source_str": source, "target_str": target})


def parse_program(program: str) -> ParsedProgram:
    parsed = ParsedProgram()
    for line in program.split("\n"):
        if not line.strip():
            continue
        try:
            call = parse_call(line)
        except ProgramError as err:
            parsed.failures.append(str(err))
            continue
        if call is None:
            parsed.ignored_lines += 1
        else:
            parsed.calls.append(call)
    return parsed


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or adjacent ranges joined (the reference's ``merge_intervals``)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


Outcome = Literal["unchanged", "edited", "reverted", "dropped_doc", "dropped_little_left", "dropped_short"]


@dataclass
class ExecutionResult:
    text: str | None  # None: the document is dropped
    outcome: Outcome
    lines_removed: int = 0  # in the returned text (0 unless the refined text is kept)
    normalizations: int = 0  # normalize calls that changed the returned text
    failures: int = 0
    ignored_lines: int = 0
    messages: list[str] = field(default_factory=list)


class Guards(MethodParams):
    """The reference's ``execute_meta_operations`` thresholds (its defaults)."""

    max_failed_calls: int = Field(2, ge=1, description="this many failed calls or more: ignore the "
                                                       "program and keep the original text (error_op)")
    max_removed_word_fraction: float = Field(
        0.95, gt=0, le=1, description="drop when at most 1 - this fraction of the words is left (threshold_2)")
    min_words: int = Field(10, ge=0, description="drop when at most this many words are left (FineWeb rule)")
    min_kept_word_fraction: float = Field(
        0.0, ge=0, le=1, description="below this fraction of words left, keep the original text (threshold_1)")


def execute_program(text: str, program: str, guards: Guards | None = None) -> ExecutionResult:
    """Run one document's program with the reference's guard rules; deterministic, never raises
    on a bad program."""
    guards = guards or Guards()
    parsed = parse_program(program)
    failures = list(parsed.failures)
    if any(c.name == "drop_doc" for c in parsed.calls):
        return ExecutionResult(None, "dropped_doc", failures=len(failures), ignored_lines=parsed.ignored_lines,
                               messages=failures)
    refined = text
    normalizations = 0
    ranges: list[tuple[int, int]] = []
    remove_all = False
    for call in parsed.calls:
        if call.name == "normalize":
            source, target = call.kwargs["source_str"], call.kwargs["target_str"]
            if source not in ("", " ") and source in refined:
                refined = refined.replace(source, target)
                normalizations += 1
        elif call.name == "remove_lines":
            if call.kwargs.get("all"):
                remove_all = True
            else:
                ranges.append((call.kwargs["line_start"], call.kwargs["line_end"]))
    lines = refined.split("\n")
    removed: set[int] = set(range(len(lines))) if remove_all else set()
    for start, end in _merge_ranges(ranges):
        if start >= len(lines):
            failures.append(f"remove_lines: lines {start}..{end} start past the last line {len(lines) - 1}")
            continue
        if end >= len(lines):
            failures.append(f"remove_lines: lines {start}..{end} end past the last line {len(lines) - 1}; clipped")
        removed.update(range(start, min(end, len(lines) - 1) + 1))
    refined = "\n".join(line for i, line in enumerate(lines) if i not in removed)

    words_before, words_after = len(text.split()), len(refined.split())
    ratio = words_after / words_before if words_before else 0.0
    program_ok = len(failures) < guards.max_failed_calls
    common = dict(failures=len(failures), ignored_lines=parsed.ignored_lines, messages=failures)
    if ratio <= 1 - guards.max_removed_word_fraction and program_ok:
        return ExecutionResult(None, "dropped_little_left", **common)
    if words_after <= guards.min_words:
        return ExecutionResult(None, "dropped_short", **common)
    if ratio >= guards.min_kept_word_fraction and program_ok:
        outcome = "edited" if refined != text else "unchanged"
        return ExecutionResult(refined, outcome, lines_removed=len(removed), normalizations=normalizations, **common)
    return ExecutionResult(text, "reverted", **common)


class ProX(DocumentTransform):
    """Writes a program per training document (with the chosen source) and executes it."""

    key = "prox"
    paper = Paper("Programming Every Example: Lifting Pre-training Data Quality like Experts at Scale",
                  url="https://arxiv.org/abs/2409.17115", arxiv="2409.17115")

    class Params(MethodParams):
        source: Literal["rule_based", "model"] = Field(
            "rule_based", description="who writes the programs: simple detectors, or a `reference` LM")
        rule_based: RuleBasedParams = Field(default_factory=RuleBasedParams)
        model: ModelSourceParams = Field(default_factory=ModelSourceParams)
        guards: Guards = Field(default_factory=Guards)
        domains: list[str] | None = Field(
            None, min_length=1, description="refine only these domains (others pass untouched); None = all. "
                                            "The 10-word guard drops short docs, e.g. arithmetic ones")
        keep_programs: bool = Field(False, description="write each program to a `prox_program` column")

    def __init__(self, params=None):
        super().__init__(params)
        self.source = program_source(self.params.source, self.params)
        # instance attributes: the select stage checks them before calling transform
        self.min_references = self.source.min_references
        self.needs_tokenizer = self.source.needs_tokenizer
        self.facts: dict = {}

    def transform(self, docs: pd.DataFrame, context: SelectionContext) -> pd.DataFrame:
        rows = np.flatnonzero(apply_domains(docs, self.params.domains, f"{context.stage}: prox"))
        subset = docs.iloc[rows].reset_index(drop=True)
        programs = self.source.programs(subset, context)
        if len(programs) != len(subset):
            raise RuntimeError(f"program source {self.params.source} returned {len(programs)} programs "
                               f"for {len(subset)} documents")
        texts = docs["text"].tolist()
        keep = np.ones(len(docs), dtype=bool)
        counts = dict.fromkeys(("unchanged", "edited", "reverted", "dropped_doc", "dropped_little_left",
                                "dropped_short"), 0)
        lines_removed = normalizations = failures = ignored = 0
        for row, text, program in tqdm(zip(rows, subset["text"], programs), total=len(rows), desc="prox",
                                       disable=not context.progress):
            result = execute_program(text, program, self.params.guards)
            counts[result.outcome] += 1
            lines_removed += result.lines_removed
            normalizations += result.normalizations
            failures += result.failures
            ignored += result.ignored_lines
            if result.text is None:
                keep[row] = False
            else:
                texts[row] = result.text
        out = docs.assign(text=texts)
        if self.params.keep_programs:
            column = [None] * len(docs)
            for row, program in zip(rows, programs):
                column[row] = program
            out = out.assign(prox_program=column)
        out = out[keep].reset_index(drop=True)
        self.stats = {"n_docs": len(docs), "n_removed": int((~keep).sum())}
        self.facts = {
            "prox_docs_refined": len(rows),
            "prox_docs_dropped": int((~keep).sum()),
            **{f"prox_docs_{name}": n for name, n in counts.items()},
            "prox_lines_removed": lines_removed,
            "prox_normalizations": normalizations,
            "prox_failed_calls": failures,
            "prox_ignored_lines": ignored,
            **self.source.facts,
        }
        return out
