"""Span corruption and fill-in-the-middle for a decoder-only model: the formats UL2 and FIM train
and the infilling task reads.

A corrupted example is one causal sequence, ``mode, input with sentinels, targets``:

    [X] the cat <s0> on the <s1> .   <s0> sat <s1> mat
    `--------- input (no loss) ----' `-- targets (loss) --'

Each noise span of the source is replaced in the input by a sentinel and follows the same
sentinel in the targets, in order (T5's format, Raffel et al. 2020, on one sequence as in
decoder-only UL2). The S-denoiser (prefix LM) has no sentinels: input = the source's first
``1 - corruption`` share, targets = the rest. Fill-in-the-middle moves the middle to the end
instead: ``<PRE> prefix <SUF> suffix <MID> middle`` (``fim_example``).

Tokens. The project's tokenizers have a fixed vocabulary with one special token, and an artifact
must keep its vocabulary to merge and compare with its parents, so no token is added. Sentinels,
mode tokens, FIM's three tokens and text-code matching's four are ASCII control bytes instead: a byte-level BPE holds every byte as one token,
and text corpora do not contain these bytes. ``DenoisingTokens.from_tokenizer`` checks that each is
one token, and ``check_absent`` that training data never holds one (a clear error, not a silent
clash). 16 sentinels cycle when an example has more spans; order tells them apart.

Span lengths follow T5's ``random_spans_noise_mask``: ``round(L * r)`` noise tokens in
``round(noise / mu)`` spans, both noise and non-noise lengths drawn as random compositions, the
source starting with non-noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from components.data.text_code import MATCH_BYTES

MODE_BYTES = {"R": 0x0E, "S": 0x0F, "X": 0x10}  # UL2's [NLU], [S2S], [NLG] paradigm tokens
SENTINEL_BYTES = tuple(range(0x11, 0x1B)) + tuple(range(0x01, 0x07))  # 16 control bytes, none of \t \n \r
FIM_BYTES = {"PRE": 0x1C, "SUF": 0x1D, "MID": 0x1E}  # fill-in-the-middle's <PRE> <SUF> <MID> (file/group/record separators)
MASK_BYTE = 0x1F  # masked language modelling's [MASK] (the unit separator)
Mode = Literal["R", "S", "X"]


@dataclass(frozen=True)
class DenoisingTokens:
    """Token ids of the mode tokens and sentinels in one tokenizer's vocabulary."""

    modes: dict[str, int]
    sentinels: tuple[int, ...]
    pad: int
    fim: dict[str, int]
    match: dict[str, int]  # text-code matching's [MATCH], [SEP], [YES], [NO] (components/data/text_code.py)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "DenoisingTokens":
        modes = {m: control_token(tokenizer, b, f"mode {m}") for m, b in MODE_BYTES.items()}
        sentinels = tuple(control_token(tokenizer, b, "sentinel") for b in SENTINEL_BYTES)
        fim = {name: control_token(tokenizer, b, f"fill-in-the-middle {name}") for name, b in FIM_BYTES.items()}
        match = {name: control_token(tokenizer, b, f"text-code matching {name}") for name, b in MATCH_BYTES.items()}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("span corruption pads with the tokenizer's pad or eos token; it has neither")
        return cls(modes, sentinels, int(pad), fim, match)

    @property
    def reserved(self) -> torch.Tensor:
        return torch.tensor([*self.modes.values(), *self.sentinels, *self.fim.values(), *self.match.values()])

    def check_absent(self, ids: torch.Tensor, where: str) -> None:
        """Refuse data that already holds a mode or sentinel token (its meaning would clash)."""
        clash = torch.isin(ids, self.reserved.to(ids.device))
        if bool(clash.any()):
            found = sorted({int(i) for i in ids[clash].tolist()})
            raise ValueError(f"{where}: the data holds token id(s) {found}, which span corruption reserves for mode "
                             "tokens and sentinels (ASCII control bytes); clean the text or use another tokenizer")


def control_token(tokenizer, byte: int, what: str) -> int:
    """The one token of a control byte in a byte-level tokenizer (refused in any other)."""
    ids = tokenizer.encode(chr(byte), add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{what} byte 0x{byte:02x} is {len(ids)} tokens in this tokenizer, not one; control "
                         "tokens need a byte-level tokenizer (byte_bpe)")
    return int(ids[0])


def random_spans(length: int, corruption: float, mean_span: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Noise spans ``[(start, end), ...]`` over ``length`` tokens, in order (T5's noise mask)."""
    n_noise = min(max(int(round(length * corruption)), 1), length - 1)
    n_spans = min(max(int(round(n_noise / mean_span)), 1), n_noise, length - n_noise)

    def composition(total: int, parts: int) -> np.ndarray:  # ``parts`` positive integers summing to ``total``
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
        return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)

    noise, keep = composition(n_noise, n_spans), composition(length - n_noise, n_spans)
    spans, at = [], 0
    for k, n in zip(keep, noise):
        at += k
        spans.append((at, at + n))
        at += n
    return spans


def corrupt(source: np.ndarray, mode: Mode, corruption: float, mean_span: float, tokens: DenoisingTokens,
            rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``(sequence, n_input)``: the corrupted example and how many of its tokens are input (no loss)."""
    source = np.asarray(source)
    if mode == "S":
        cut = max(1, min(len(source) - 1, int(round(len(source) * (1 - corruption)))))
        inputs, targets = source[:cut], source[cut:]
    else:
        inputs_parts, target_parts, at = [], [], 0
        for i, (start, end) in enumerate(random_spans(len(source), corruption, mean_span, rng)):
            sentinel = tokens.sentinels[i % len(tokens.sentinels)]
            inputs_parts += [source[at:start], [sentinel]]
            target_parts += [[sentinel], source[start:end]]
            at = end
        inputs_parts.append(source[at:])
        inputs, targets = np.concatenate(inputs_parts), np.concatenate(target_parts)
    sequence = np.concatenate([[tokens.modes[mode]], inputs, targets]).astype(np.int64)
    return sequence, 1 + len(inputs)


def source_length(seq_len: int, mode: Mode, corruption: float, mean_span: float) -> int:
    """The longest source whose corrupted example fits ``seq_len`` (a mode token, and two
    sentinels per span)."""
    if mode == "S":
        return seq_len - 1
    length = seq_len - 1
    while length > 2:
        n_noise = min(max(int(round(length * corruption)), 1), length - 1)
        spans = min(max(int(round(n_noise / mean_span)), 1), n_noise, length - n_noise)
        if length + 2 * spans <= seq_len - 1:
            return length
        length -= 1
    raise ValueError(f"seq_len {seq_len} is too short for span corruption")


def infill_example(prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray,
                   tokens: DenoisingTokens) -> tuple[np.ndarray, int]:
    """One middle span to fill in, in the X-denoiser's format: ``[X] prefix <s0> suffix <s0>``
    then the middle. Returns ``(sequence, n_context)``; the middle is ``sequence[n_context:]``."""
    s0 = tokens.sentinels[0]
    context = np.concatenate([[tokens.modes["X"]], prefix, [s0], suffix, [s0]]).astype(np.int64)
    return np.concatenate([context, middle]).astype(np.int64), len(context)


def fim_example(prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray,
                tokens: DenoisingTokens) -> tuple[np.ndarray, int]:
    """Fill-in-the-middle's PSM order (Bavarian et al. 2022): ``<PRE> prefix <SUF> suffix <MID>``
    then the middle. Returns ``(sequence, n_context)``; the middle is ``sequence[n_context:]``."""
    context = np.concatenate([[tokens.fim["PRE"]], prefix, [tokens.fim["SUF"]], suffix,
                              [tokens.fim["MID"]]]).astype(np.int64)
    return np.concatenate([context, middle]).astype(np.int64), len(context)
