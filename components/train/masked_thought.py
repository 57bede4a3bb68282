"""Masked Thought fine-tuning (MFT; Chen et al. 2024): mask part of the chain of thought in the input.

Follows the reference code (``AlibabaResearch/DAMO-ConvAI/MaskedThought``): before the forward
pass every target-side input token is replaced, independently with probability ``mask_rate``,
by a mask token; the labels keep the original tokens, so the model learns to predict each step
while some earlier steps are hidden. ``mask_rate_warmup`` is the repo's ``update_mask_rate``
ramp (``rate = min(p, p * global_step / (steps * warmup + 1))``; its GSM8K script uses p=0.4,
warmup 0.66); ``random_replace_rate`` is its ``replace``/``replace_rate`` (a random token instead
of the mask token; the GSM8K script uses 1.0, the MetaMath script the mask token at p=0.2).

Different here, because the trainer feeds packed blocks of text rather than (question, answer)
pairs: the target side is found on the decoded tokens, separately between special tokens
(documents), and a token is target side when any of its characters is. By default that text is
read with the ``arithmetic_formatted`` formats (``arithmetic_formats.target_spans``: a scratchpad
after ``Target:\\n`` up to the next example, an answer after ``a+b=`` up to the line end, and the
piece of a scratchpad or answer a block starts in); ``target_pattern`` replaces this with a
regular expression for other data. The loss stays the plain causal-LM loss over every token, as
in the pretraining-style setup of Lee et al.; the repo's SFT loss ignores the question tokens.

The mask token is an existing one (the repo adds ``<mask>`` and resizes the embeddings, which a
fixed-vocabulary artifact cannot): ``mask_token_id`` if set, else the tokenizer's pad, unk, then
eos token (``byte_bpe``: ``<|endoftext|>`` for all three). Draws come from a torch ``Generator``
seeded by ``(seed, step)``, so a resumed run masks exactly as the uninterrupted one did.

The method needs the tokenizer to decode tokens: ``use_tokenizer(tokenizer)`` must be called
before training (by the train stage, which holds the tokens' tokenizer); ``bind`` fails otherwise.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from components.data.arithmetic_formats import target_spans
from components.registry import Paper
from components.train.method import TrainingMethod, step_seed


class MaskedThoughtError(ValueError):
    """Masked Thought cannot run as configured (no tokenizer, bad mask token...)."""


class MaskedThought(TrainingMethod):
    """Causal-LM training on inputs whose target-side tokens are randomly masked."""

    key = "masked_thought"
    paper = Paper(
        title="Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical "
              "Reasoning Learning of Language Models",
        url="https://arxiv.org/abs/2403.02178",
        arxiv="2403.02178",
    )

    class Params(TrainingMethod.Params):
        mask_rate: float = Field(0.2, ge=0, lt=1, description="probability of masking each target-side token "
                                                               "(MetaMath script: 0.2; GSM8K script: 0.4)")
        mask_rate_warmup: float = Field(0.0, ge=0, le=1, description="fraction of the steps over which the rate "
                                                                     "ramps up from 0 (repo: 0.66); 0 = constant")
        random_replace_rate: float = Field(0.0, ge=0, le=1, description="share of masked positions given a random "
                                                                        "token instead of the mask token")
        mask_token_id: int | None = Field(None, ge=0, description="None: the tokenizer's pad, else unk, else eos")
        target_pattern: str | None = Field(None, min_length=1, description="regex over decoded text whose matches "
                                           "are target side; None: the arithmetic formats' answers")

        @field_validator("target_pattern")
        @classmethod
        def _compiles(cls, value: str | None) -> str | None:
            if value is None:
                return value
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"target_pattern {value!r} is not a valid regular expression: {err}") from None
            return value

    def __init__(self, params=None):
        super().__init__(params)
        pattern = self.params.target_pattern
        self._spans = target_spans if pattern is None else (
            lambda text, compiled=re.compile(pattern): [m.span() for m in compiled.finditer(text)])
        self._pieces: list[str] | None = None
        self._special: np.ndarray | None = None
        self._mask_id: int | None = None
        self._vocab_size: int | None = None
        self._step = 0

    # -- setup ---------------------------------------------------------------------------------

    def use_tokenizer(self, tokenizer) -> None:
        """Decode every token once, and pick the mask token."""
        size = len(tokenizer)
        self._pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        for i in range(size)]
        self._special = np.zeros(size, dtype=bool)
        self._special[[i for i in tokenizer.all_special_ids if i is not None and 0 <= i < size]] = True
        chosen = self.params.mask_token_id
        if chosen is None:
            for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
                chosen = getattr(tokenizer, name, None)
                if chosen is not None:
                    break
        if chosen is None:
            raise MaskedThoughtError("masked_thought: the tokenizer has no pad, unk or eos token; set mask_token_id")
        if chosen >= size:
            raise MaskedThoughtError(f"masked_thought: mask_token_id {chosen} is outside the tokenizer's {size} tokens")
        self._mask_id = int(chosen)

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        if self._pieces is None:
            raise MaskedThoughtError(
                "masked_thought needs the tokenizer to find target-side tokens: call "
                "method.use_tokenizer(tokenizer) before training")
        vocab = model.get_output_embeddings().out_features
        if len(self._pieces) > vocab:
            raise MaskedThoughtError(f"masked_thought: the tokenizer has {len(self._pieces)} tokens but the model "
                                     f"only {vocab}")
        self._vocab_size = len(self._pieces)

    @property
    def mask_id(self) -> int | None:
        return self._mask_id

    # -- masking -------------------------------------------------------------------------------

    def target_positions(self, batch: torch.Tensor) -> torch.Tensor:
        """Bool ``(batch, seq)``: tokens inside a ``target_pattern`` match (never special tokens)."""
        if self._pieces is None:
            raise MaskedThoughtError("masked_thought: call use_tokenizer(tokenizer) first")
        ids = batch.detach().cpu().numpy()
        out = np.zeros(ids.shape, dtype=bool)
        for row, row_ids in enumerate(ids):
            special = self._special[row_ids]
            bounds = np.flatnonzero(special)
            starts = np.concatenate([[0], bounds + 1])
            ends = np.concatenate([bounds, [len(row_ids)]])
            for start, end in zip(starts.tolist(), ends.tolist()):
                if end > start:
                    out[row, start:end] = self._match_segment(row_ids[start:end])
        return torch.from_numpy(out)

    def _match_segment(self, ids: np.ndarray) -> np.ndarray:
        pieces = [self._pieces[i] for i in ids.tolist()]
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        text = "".join(pieces)
        covered = np.zeros(len(text) + 1, dtype=np.int64)  # difference array of matched characters
        for start, end in self._spans(text):
            if end > start:
                covered[start] += 1
                covered[end] -= 1
        prefix = np.concatenate([[0], np.cumsum(np.cumsum(covered)[:-1] > 0)])  # matched chars before i
        ends = np.cumsum(lengths)
        starts = ends - lengths
        return (prefix[ends] - prefix[starts]) > 0

    def rate_at(self, step: int) -> float:
        """Mask rate of 1-based ``step`` (the repo's ramp counts completed steps)."""
        p = self.params
        if p.mask_rate_warmup == 0:
            return p.mask_rate
        return min(p.mask_rate, p.mask_rate * (step - 1) / (p.steps * p.mask_rate_warmup + 1))

    def mask_batch(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input ids, target-side positions) of ``batch`` at ``step``; deterministic."""
        if self._mask_id is None:
            raise MaskedThoughtError("masked_thought: call use_tokenizer(tokenizer) first")
        target = self.target_positions(batch)
        generator = torch.Generator().manual_seed(step_seed(self.params.seed, b"MFT", step))
        draws = torch.rand(batch.shape, generator=generator)
        chosen = target & (draws < self.rate_at(step))
        masked = batch.detach().cpu().clone()
        masked[chosen] = self._mask_id
        if self.params.random_replace_rate > 0:
            swap = chosen & (torch.rand(batch.shape, generator=generator) < self.params.random_replace_rate)
            random_ids = torch.randint(0, self._vocab_size or len(self._pieces), batch.shape, generator=generator)
            masked[swap] = random_ids[swap].to(masked.dtype)
        return masked.to(batch.device), target

    # -- trainer hooks -------------------------------------------------------------------------

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        self._step = step

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        masked, _ = self.mask_batch(batch, self._step)
        return model(input_ids=masked, labels=batch).loss

    def finalize(self, model: nn.Module) -> dict:
        return {"mask_token_id": self._mask_id}
