"""Masked language modelling, the pretraining objective of the encoders of
``components/model/encoder.py`` (BERT, Devlin et al. 2019; MosaicBERT, Portes et al. 2023, arXiv
2312.17482, which raises the masking rate from BERT's 15% to 30%).

Each step picks ``mask_rate`` of every block's tokens, drawn from ``(seed, step)`` alone; of those,
80% become ``[MASK]``, 10% a random token and 10% stay (BERT's split, which MosaicBERT keeps), and
the loss is the cross-entropy of the original tokens at the picked positions only. ``[MASK]`` is
a control byte of the byte-level tokenizer (``components/data/denoising.MASK_BYTE``), so the
vocabulary stays the tokens' own, as for UL2's sentinels.

Only an encoder trains this way, and an encoder trains no other way: a causal objective on a
bidirectional model would let each position read the token it predicts.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from components.data.denoising import MASK_BYTE, control_token
from components.model.presets import is_encoder
from components.registry import Paper
from components.train.method import TrainingMethod, step_seed

IGNORE = -100  # HF's ignored label


def pick_positions(rows: int, length: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``[rows, length]`` bool: ``round(rate * length)`` positions of each row, uniformly at random."""
    order = torch.rand(rows, length, generator=generator).argsort(dim=1)
    picked = torch.zeros(rows, length, dtype=torch.bool)
    picked.scatter_(1, order[:, :max(1, round(rate * length))], True)
    return picked


def mask_tokens(ids: torch.Tensor, rate: float, mask_id: int, vocab_size: int, generator: torch.Generator,
                to_mask: float = 0.8, to_random: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids, labels): ``round(rate * length)`` positions of each row picked; of them
    ``to_mask`` become ``mask_id``, ``to_random`` a random token, the rest stay. Labels hold the
    original token at picked positions and ``IGNORE`` elsewhere."""
    rows, length = ids.shape
    picked = pick_positions(rows, length, rate, generator)
    roll = torch.rand(rows, length, generator=generator)
    random_tokens = torch.randint(0, vocab_size, (rows, length), generator=generator)
    picked, roll, random_tokens = picked.to(ids.device), roll.to(ids.device), random_tokens.to(ids.device)
    corrupted = torch.where(picked & (roll < to_mask), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(picked & (roll >= to_mask) & (roll < to_mask + to_random), random_tokens, corrupted)
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE))
    return corrupted, labels


def mask_token_id(tokenizer) -> int:
    return control_token(tokenizer, MASK_BYTE, "[MASK]")


class MaskedLanguageModelling(TrainingMethod):
    key = "mlm"
    paper = Paper(title="MosaicBERT: A Bidirectional Encoder Optimized for Fast Pretraining",
                  url="https://arxiv.org/abs/2312.17482", arxiv="2312.17482")

    class Params(TrainingMethod.Params):
        mask_rate: float = Field(0.3, gt=0, lt=1, description="Share of each block's tokens predicted (MosaicBERT: "
                                                              "0.3; BERT: 0.15).")
        to_mask: float = Field(0.8, ge=0, le=1, description="Share of the picked tokens replaced by [MASK].")
        to_random: float = Field(0.1, ge=0, le=1, description="Share replaced by a random token (the rest stay).")

        @model_validator(mode="after")
        def _shares_fit(self):
            if self.to_mask + self.to_random > 1:
                raise ValueError(f"to_mask ({self.to_mask}) + to_random ({self.to_random}) exceeds 1")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self._mask_id: int | None = None
        self._vocab_size = 0
        self._step = 0

    def use_tokenizer(self, tokenizer) -> None:
        self._mask_id, self._vocab_size = mask_token_id(tokenizer), len(tokenizer)

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        if self._mask_id is None:
            raise ValueError("mlm needs the tokenizer for its [MASK] token: call method.use_tokenizer(tokenizer) "
                             "before training")

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        self._step = step

    def corrupt(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        generator = torch.Generator().manual_seed(step_seed(p.seed, b"MLM", step))
        return mask_tokens(batch, p.mask_rate, self._mask_id, self._vocab_size, generator, p.to_mask, p.to_random)

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        ids, labels = self.corrupt(batch, self._step)
        return model(input_ids=ids, labels=labels).loss


def objective_mismatch(encoder: bool, method_key: str) -> str | None:
    """Why a model (an encoder or not) cannot train with ``method_key``, or None: an encoder trains
    with ``mlm`` and a decoder never does (see the module docstring)."""
    if encoder and method_key != MaskedLanguageModelling.key:
        return (f"a masked-LM encoder trains with method 'mlm', not {method_key!r} (a causal objective would let "
                "each position read the token it predicts)")
    if not encoder and method_key == MaskedLanguageModelling.key:
        return ("method 'mlm' trains a masked-LM encoder (model: encoder_<size>_<position>, e.g. "
                "encoder_micro_alibi), not a causal decoder")
    return None


def check_objective(model: nn.Module, method_key: str, where: str) -> None:
    """Refuse a loaded model that cannot train with ``method_key`` (``objective_mismatch``)."""
    problem = objective_mismatch(is_encoder(model), method_key)
    if problem:
        raise ValueError(f"{where}: {problem}")
