"""Program sources for ProX (``components/data/prox.py``): who writes each document's program.

- ``rule_based`` (default): simple detectors over what a document shows (never ``noise_label``),
  written as ProX programs: ``drop_doc()`` for gibberish-like documents (word salad with almost
  no function words, or mostly tokens with symbols inside), ``remove_lines`` for boilerplate
  lines (short lines with a phrase such as "all rights reserved" or "privacy policy"), lines
  that are mostly symbols of several kinds, and the repeats in a document that repeats its lines,
  ``normalize`` for invisible or non-breaking spaces. These rules and their thresholds are ours
  (guessed, then measured on the default corpus: table borders, heading rules and the repeated
  lines of ordinary code stay), not the paper's.
- ``model``: a reference LM writes the programs, as in the reference pipeline
  (``data_gen/tasks/apply_doc_refining.py`` / ``apply_chunk_refining.py``): a document-level
  pass on the raw text, then, for documents not dropped, a chunk-level pass on chunks of
  line-numbered text (``[000]line``, numbering global to the document, chunks of at most
  ``chunk_tokens`` tokens) wrapped as ``[doc]\\n...\\n[/doc]``, with the reference's system
  prompt and the tokenizer's chat template when it has one (else a plain-text template), greedy
  decoding, and chunk outputs joined line by line. The paper's refiners are 0.3B+ LMs fine-tuned
  on programs distilled from a large LLM; a model trained by this pipeline has never seen a
  program and writes garbage, which the executor ignores or counts as failed calls. The source is
  the plumbing for a real refiner (any HF causal LM checkpoint that shares the tokenizer).
"""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from components.data.lm_scoring import left_padded
from components.data.selector import SelectionContext, SelectionError, pick_reference
from components.registry import MethodParams

DEFAULT_BOILERPLATE_PHRASES = (
    "all rights reserved", "privacy policy", "cookie policy", "terms of service", "terms of use",
    "we use cookies", "uses cookies", "use of cookies", "accept all cookies", "cookie preferences",
    "subscribe to our", "newsletter", "skip to main content", "skip to content", "back to top",
    "forgot your password", "follow us on", "share on facebook", "share on twitter",
    "share by email", "read more", "enable javascript", "powered by", "contact us", "registered trademark",
    "unauthorized reproduction",
)
# common English function words: word salad drawn from a vocabulary almost never hits them
_FUNCTION_WORDS = frozenset(
    "the of and to a in is it that for be with as on are this by or an not from at which can if was "
    "were has have but they their you we".split())
_INNER_SYMBOL = re.compile(r"[A-Za-z0-9][$^~@#&|\\<>{}=+*%]+[A-Za-z0-9]")
_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."  # the reference's
_PLACEHOLDER = "\x00PROX_USER_MESSAGE\x00"


def line_numbered(lines: list[str], first: int = 0, digits: int = 3) -> str:
    """Lines as the refining model sees them: ``[000]text`` (``trunc_text`` in the reference)."""
    return "\n".join(f"[{first + i:0{digits}d}]{line}" for i, line in enumerate(lines))


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


class RuleBasedParams(MethodParams):
    """Detectors of the ``rule_based`` program source; a threshold of null disables its rule."""

    boilerplate_phrases: tuple[str, ...] = Field(
        DEFAULT_BOILERPLATE_PHRASES, description="case-insensitive phrases marking a boilerplate line")
    boilerplate_max_words: int = Field(25, ge=1, description="longer lines are content, whatever they contain")
    symbol_line_fraction: float | None = Field(
        0.8, gt=0, le=1, description="remove lines whose non-space characters are at least this share symbols")
    symbol_line_min_chars: int = Field(8, ge=1, description="shorter lines (brackets, `):`) are left alone")
    symbol_line_min_kinds: int = Field(
        3, ge=1, description="distinct symbols needed: one- or two-symbol rules and table borders are layout")
    repeated_line_fraction: float | None = Field(
        0.6, gt=0, le=1, description="when repeats are at least this share of non-blank lines, remove the "
                                     "repeats (first copies stay); ordinary code repeats < 50%")
    gibberish_min_words: int = Field(30, ge=1, description="shorter docs are never judged gibberish")
    salad_max_function_word_fraction: float | None = Field(
        0.05, ge=0, le=1, description="drop_doc when alphabetic words (>= salad_min_alpha_fraction) include "
                                      "fewer function words than this share (English prose: > 0.2)")
    salad_min_alpha_fraction: float = Field(0.9, ge=0, le=1)
    inner_symbol_fraction: float | None = Field(
        0.35, gt=0, le=1, description="drop_doc when at least this share of tokens mix letters with symbols "
                                      "inside (random character strings ~0.5; code < 0.25)")
    normalize: list[tuple[str, str]] = Field(
        default_factory=lambda: [("\u00a0", " "), ("\u200b", ""), ("\ufeff", "")],
        description="(source, target) pairs replaced everywhere (normalize calls); a list, not a mapping, "
                    "so odd characters never become param names")


class RuleBasedPrograms:
    """Writes a program per document from the ``RuleBasedParams`` detectors."""

    key = "rule_based"
    min_references = 0
    needs_tokenizer = False

    def __init__(self, params: RuleBasedParams):
        self.params = params
        self.phrases = tuple(p.lower() for p in params.boilerplate_phrases)
        self.facts: dict = {}

    def is_gibberish(self, text: str) -> bool:
        p = self.params
        tokens = text.split()
        if len(tokens) < p.gibberish_min_words:
            return False
        if p.inner_symbol_fraction is not None:
            inner = sum(bool(_INNER_SYMBOL.search(t)) and any(c.isalpha() for c in t) for t in tokens)
            if inner / len(tokens) >= p.inner_symbol_fraction:
                return True
        if p.salad_max_function_word_fraction is not None:
            words = [t.strip(".,;:!?\"'()[]").lower() for t in tokens]
            alpha = sum(w.isalpha() for w in words) / len(words)
            function = sum(w in _FUNCTION_WORDS for w in words) / len(words)
            if alpha >= p.salad_min_alpha_fraction and function < p.salad_max_function_word_fraction:
                return True
        return False

    def _symbol_line(self, line: str) -> bool:
        p = self.params
        chars = [c for c in line if not c.isspace()]
        if p.symbol_line_fraction is None or len(chars) < p.symbol_line_min_chars:
            return False
        symbols = [c for c in chars if not c.isalnum()]
        return len(symbols) / len(chars) >= p.symbol_line_fraction and len(set(symbols)) >= p.symbol_line_min_kinds

    def _boilerplate_line(self, line: str) -> bool:
        lowered = line.lower()
        return len(line.split()) <= self.params.boilerplate_max_words and any(p in lowered for p in self.phrases)

    def program(self, text: str) -> str:
        if self.is_gibberish(text):
            return "drop_doc()"
        calls = [f"normalize(source_str={s!r}, target_str={t!r})"
                 for s, t in self.params.normalize if s and s in text]
        lines = text.split("\n")
        keys = [" ".join(line.split()).lower() for line in lines]
        non_blank = [k for k in keys if k]
        repeats = len(non_blank) - len(set(non_blank))
        drop_repeats = (self.params.repeated_line_fraction is not None and non_blank
                        and repeats / len(non_blank) >= self.params.repeated_line_fraction)
        remove, seen = [], set()
        for i, (line, key) in enumerate(zip(lines, keys)):
            if not key:
                continue
            if self._boilerplate_line(line) or self._symbol_line(line) or (drop_repeats and key in seen):
                remove.append(i)
            seen.add(key)
        calls += [f"remove_lines(line_start={a}, line_end={b})" for a, b in _ranges(remove)]
        return "keep_doc()\n" + ("\n".join(calls) if calls else "skip()")

    def programs(self, docs: pd.DataFrame, context: SelectionContext) -> list[str]:
        return [self.program(t) for t in docs["text"]]


class ModelSourceParams(MethodParams):
    """The ``model`` program source: a `reference` LM writes the programs."""

    reference: str | None = Field(None, description="`reference` input (stage name) to use; None = the first")
    levels: tuple[Literal["doc", "chunk"], ...] = Field(
        ("doc", "chunk"), min_length=1, description="document-level and/or chunk-level programs")
    chunk_tokens: int = Field(1500, ge=8, description="numbered-line tokens per chunk (reference: 1500); "
                                                      "lowered to fit the model's context")
    doc_max_new_tokens: int = Field(16, ge=1, description="a document program is one short call")
    chunk_max_new_tokens: int = Field(256, ge=1, description="reference: 256")
    batch_size: int = Field(8, ge=1)
    system_prompt: str = Field(_SYSTEM_PROMPT, description="the reference's system message")


class ModelPrograms:
    """Generates programs with a causal LM through HF ``generate`` (greedy), batch by batch."""

    key = "model"
    min_references = 1
    needs_tokenizer = True

    def __init__(self, params: ModelSourceParams):
        self.params = params
        self.facts: dict = {}

    def _reference(self, context: SelectionContext):
        return pick_reference(context, self.params.reference, "prox source `model`").model

    def template(self, tokenizer) -> tuple[list[int], list[int]]:
        """Token ids before and after the user message (chat template if the tokenizer has one)."""
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "system", "content": self.params.system_prompt},
                 {"role": "user", "content": _PLACEHOLDER}],
                add_generation_prompt=True, tokenize=False)
        else:
            rendered = f"{self.params.system_prompt}\n\n{_PLACEHOLDER}\n"
        head, tail = rendered.split(_PLACEHOLDER)
        return _ids(tokenizer, head), _ids(tokenizer, tail)

    def _body_room(self, tokenizer, max_positions: int, max_new_tokens: int, name: str, where: str) -> int:
        head, tail = self.template(tokenizer)
        room = max_positions - max_new_tokens - len(head) - len(tail)
        if room < 8:
            raise SelectionError(
                f"{where}: prox model.{name}={max_new_tokens} leaves {max(room, 0)} tokens for the document in "
                f"the reference model's {max_positions}-token context; lower model.{name}")
        return room

    def doc_prompts(self, tokenizer, texts: list[str], max_positions: int, where: str = "prox") -> list[list[int]]:
        """Document-level prompts: the raw text (truncated to fit) in the template."""
        room = self._body_room(tokenizer, max_positions, self.params.doc_max_new_tokens, "doc_max_new_tokens", where)
        head, tail = self.template(tokenizer)
        encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [head + e.ids[:room] + tail for e in encodings]

    def chunk_prompts(self, tokenizer, text: str, max_positions: int, where: str = "prox") -> list[list[int]]:
        """Chunk-level prompts for one document: ``[doc]\\n[000]line\\n...\\n[/doc]`` per chunk of at
        most ``chunk_tokens`` numbered-line tokens (a longer line is cut to fit, alone in its chunk)."""
        room = self._body_room(tokenizer, max_positions, self.params.chunk_max_new_tokens, "chunk_max_new_tokens",
                               where)
        head, tail = self.template(tokenizer)
        open_, close, newline = _ids(tokenizer, "[doc]\n"), _ids(tokenizer, "\n[/doc]"), _ids(tokenizer, "\n")
        budget = max(1, min(self.params.chunk_tokens, room - len(open_) - len(close)))
        lines = text.split("\n")
        numbered = [line_numbered([line], first=i) for i, line in enumerate(lines)]
        chunks: list[list[int]] = []
        current: list[int] = []
        for enc in tokenizer.backend_tokenizer.encode_batch(numbered, add_special_tokens=False):
            if current and len(current) + len(newline) + len(enc.ids) > budget:
                chunks.append(current)
                current = []
            current = current + newline + enc.ids if current else list(enc.ids)
        if current:
            chunks.append(current)
        return [head + open_ + chunk[:budget] + close + tail for chunk in chunks]

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of token-id prompts (left-padded batches), decoded and stripped."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(model.parameters()).device
        outputs: list[str] = []
        for start in range(0, len(prompts), self.params.batch_size):
            ids, mask = left_padded(prompts[start : start + self.params.batch_size], pad)
            width = ids.shape[1]
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            new = generated[:, width:].cpu()
            self.facts["prox_model_generated_tokens"] = (self.facts.get("prox_model_generated_tokens", 0)
                                                         + int((new != pad).sum()))
            # the reference strips spaces only: newlines separate the program's calls
            outputs += [tokenizer.decode(row, skip_special_tokens=True).strip(" ") for row in new.tolist()]
        return outputs

    def programs(self, docs: pd.DataFrame, context: SelectionContext) -> list[str]:
        from components.data.lm_scoring import check_tokenizer_matches
        from components.data.prox import parse_program

        model = self._reference(context)
        tokenizer = context.tokenizer
        check_tokenizer_matches(model, tokenizer, f"{context.stage}: prox model source")
        model.eval()
        p = self.params
        max_positions = getattr(model.config, "max_position_embeddings", None) or 10**9
        texts = docs["text"].tolist()
        self.facts = {}
        dropped = np.zeros(len(texts), dtype=bool)
        if "doc" in p.levels:
            prompts = self.doc_prompts(tokenizer, texts, max_positions, context.stage)
            outputs = self.generate(model, tokenizer, prompts, p.doc_max_new_tokens)
            # the doc-level program only decides drop/keep; its garbage does not count against chunk programs
            dropped = np.array([any(c.name == "drop_doc" for c in parse_program(o).calls) for o in outputs])
        self.facts["prox_model_doc_drops"] = int(dropped.sum())
        programs = ["drop_doc()" if d else "keep_doc()" for d in dropped]
        if "chunk" in p.levels:
            owners, prompts = [], []
            for i in np.flatnonzero(~dropped):
                chunk_prompts = self.chunk_prompts(tokenizer, texts[i], max_positions, context.stage)
                owners += [i] * len(chunk_prompts)
                prompts += chunk_prompts
            outputs = self.generate(model, tokenizer, prompts, p.chunk_max_new_tokens) if prompts else []
            self.facts["prox_model_chunks"] = len(prompts)
            for owner, output in zip(owners, outputs):
                programs[owner] += "\n" + output
        return programs


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)


PROGRAM_SOURCES = {RuleBasedPrograms.key: RuleBasedPrograms, ModelPrograms.key: ModelPrograms}


def program_source(key: str, params) -> RuleBasedPrograms | ModelPrograms:
    """The program source ``key`` configured from the ProX params (its ``rule_based``/``model`` field)."""
    if key not in PROGRAM_SOURCES:
        raise ValueError(f"unknown prox program source {key!r}; known: {', '.join(sorted(PROGRAM_SOURCES))}")
    return PROGRAM_SOURCES[key](getattr(params, key))
