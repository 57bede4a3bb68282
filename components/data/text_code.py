"""Text–code pairs cut from Python source, and the text–code matching format of a decoder.

CodeT5+ (Wang et al. 2023, arXiv 2305.07922, §3.2) trains *text–code matching*: given a text
and a code snippet, predict whether they share the same semantics, with hard negatives. There
the decoder reads the code while cross-attending to the text encoder, and a linear head on its
``[EOS]`` state classifies the pair. This project's models are decoder-only ``LlamaForCausalLM``s
that must stay loadable by every stage, so the pair is one causal sequence and the verdict is the
next token, read by the LM head itself::

    [MATCH] text [SEP] code  ->  [YES] | [NO]

[Deviation: no separate head, so nothing is added to the saved model; the verdict tokens are
control bytes like UL2's mode tokens (``components/data/denoising.py``).]

Pairs. A pair is a function's docstring (its first paragraph, as CodeSearchNet's queries) and the
function without its docstring (signature and body). ``find_pairs`` reads them from decoded text
with the ``def`` line and the indentation of the lines after it, so a function cut by the end of
the text is kept only as far as it goes.

Negatives. CodeT5+ mines hard negatives with its contrastive encoder's similarities. Here the
similarity is lexical [deviation]: the cosine of the code snippets' token-count vectors
(``most_similar``), so a hard negative is the other function that uses the most similar tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: ``[MATCH]`` (the mode), ``[SEP]`` between text and code, and the verdicts: BEL, BS, VT and NUL,
#: bytes text corpora do not hold (``DenoisingTokens.check_absent`` refuses data that does).
MATCH_BYTES = {"MATCH": 0x07, "SEP": 0x08, "YES": 0x0B, "NO": 0x00}
#: Share of a matching example's tokens the text may take (the code takes the rest).
TEXT_SHARE = 0.3

_DEF = re.compile(r"^(?P<indent>[ \t]*)(?:async\s+)?def\s+\w+\s*\(", re.M)
_DOCSTRING = re.compile(r'[ \t]*[rRuU]?("""|\'\'\')(?P<doc>.*?)\1[ \t]*\n', re.S)


def _first_paragraph(doc: str) -> str:
    paragraph = re.split(r"\n[ \t]*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def find_pairs(text: str) -> list[tuple[str, str]]:
    """``[(docstring's first paragraph, function without its docstring), ...]`` of every function
    in ``text`` whose body starts with a docstring, in order."""
    pairs = []
    for match in _DEF.finditer(text):
        indent = _indent(match.group("indent"))
        header_end = _header_end(text, match.end())
        if header_end is None:
            continue
        doc = _DOCSTRING.match(text, header_end)
        if doc is None or not _first_paragraph(doc.group("doc")):
            continue
        body_lines = []
        for line in text[doc.end():].split("\n"):
            if line.strip() and _indent(line) <= indent:
                break
            body_lines.append(line)
        body = "\n".join(body_lines).rstrip()
        if body.strip():
            pairs.append((_first_paragraph(doc.group("doc")), text[match.start():header_end] + body + "\n"))
    return pairs


def _indent(line: str) -> int:
    line = line.expandtabs()
    return len(line) - len(line.lstrip())


def _header_end(text: str, at: int) -> int | None:
    """Index just past the newline that ends a ``def`` header (its parentheses may span lines)."""
    depth = 1
    while at < len(text):
        char = text[at]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "\n" and depth == 0:
            return at + 1 if text[:at].rstrip().endswith(":") else None
        at += 1
    return None


def fit_pair(text_ids: list[int] | np.ndarray, code_ids: list[int] | np.ndarray,
             seq_len: int) -> tuple[list[int], list[int]]:
    """The text and code a matching example of ``seq_len`` keeps: room is left for
    ``[MATCH]``, ``[SEP]`` and the verdict; the text takes at most ``TEXT_SHARE`` of the rest."""
    room = seq_len - 3
    if room < 2:
        raise ValueError(f"seq_len {seq_len} is too short for a text-code matching example")
    text_ids = list(text_ids)[:max(1, int(room * TEXT_SHARE))]
    return text_ids, list(code_ids)[:room - len(text_ids)]


def matching_example(text_ids: list[int] | np.ndarray, code_ids: list[int] | np.ndarray, seq_len: int,
                     match: dict[str, int]) -> np.ndarray:
    """``[MATCH] text [SEP] code``, cut by ``fit_pair`` (the verdict follows it)."""
    text_ids, code_ids = fit_pair(text_ids, code_ids, seq_len)
    return np.array([match["MATCH"], *text_ids, match["SEP"], *code_ids], dtype=np.int64)


def most_similar(code_ids: list[list[int]], vocab_size: int) -> np.ndarray:
    """For each snippet, the index of the most similar *other* snippet: the cosine of token-count
    vectors (ties to the lowest index)."""
    if len(code_ids) < 2:
        raise ValueError(f"hard negatives need at least 2 snippets, got {len(code_ids)}")
    counts = np.zeros((len(code_ids), vocab_size), dtype=np.float32)
    for row, ids in enumerate(code_ids):
        np.add.at(counts[row], np.asarray(ids, dtype=np.int64), 1.0)
    counts /= np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-12)
    similarity = counts @ counts.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


@dataclass(frozen=True)
class MatchingPairs:
    """Tokenized text-code pairs (no text or code twice), with each code snippet's hard negative."""

    texts: list[list[int]]
    codes: list[list[int]]
    hardest: np.ndarray  # hardest[i]: the snippet most similar to codes[i], another pair's

    @classmethod
    def from_text(cls, text: str, tokenizer) -> "MatchingPairs":
        seen_texts, seen_codes, texts, codes = set(), set(), [], []
        for doc, code in find_pairs(text):
            # a repeated docstring or function would make a "mismatched" pair a matched one
            if doc in seen_texts or code in seen_codes:
                continue
            seen_texts.add(doc)
            seen_codes.add(code)
            # verbose=False: a function longer than the model's context is cut later, by fit_pair
            texts.append(list(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]))
            codes.append(list(tokenizer(code, add_special_tokens=False, verbose=False)["input_ids"]))
        hardest = most_similar(codes, len(tokenizer)) if len(codes) >= 2 else np.zeros(len(codes), dtype=np.int64)
        return cls(texts, codes, hardest)

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, tokenizer) -> "MatchingPairs":
        """The pairs of the text the blocks hold, read as one stream (a tokenize stage packs its
        documents into consecutive blocks, so a function may span two)."""
        text = tokenizer.decode(np.asarray(blocks).reshape(-1).tolist(), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        return cls.from_text(text, tokenizer)

    def __len__(self) -> int:
        return len(self.texts)

    def draw(self, rng: np.random.Generator, hard_negatives: float, seq_len: int,
             match: dict[str, int]) -> tuple[np.ndarray, int]:
        """``(sequence, n_input)``: a random text with its own function or, half the time, another
        (the most similar one with probability ``hard_negatives``), then the verdict token, the
        one target."""
        i = int(rng.integers(len(self)))
        matched = bool(rng.random() < 0.5)
        if matched:
            j = i
        elif rng.random() < hard_negatives:
            j = int(self.hardest[i])
        else:
            j = int(rng.integers(len(self) - 1))
            j += j >= i
        example = matching_example(self.texts[i], self.codes[j], seq_len, match)
        return np.append(example, match["YES" if matched else "NO"]).astype(np.int64), len(example)
