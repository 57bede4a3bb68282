"""Base of the training methods that rewrite every batch around control tokens (UL2's mode tokens
and sentinels, FIM's ``<PRE>``/``<SUF>``/``<MID>``; ``components/data/denoising.py`` holds them).

It finds the tokens in the training tokenizer, refuses to train without them, and keeps the step
so that ``loss`` rewrites the batch as a pure function of ``(seed, step)``.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from components.data.denoising import DenoisingTokens
from components.train.method import TrainingMethod


class ControlTokenMethod(TrainingMethod):
    """A method whose ``loss`` rewrites each batch with control tokens of the tokenizer."""

    #: What the tokens are for, named in the error when the tokenizer was not given.
    control_tokens: ClassVar[str] = "control tokens"

    def __init__(self, params=None):
        super().__init__(params)
        self._tokens: DenoisingTokens | None = None
        self._step = 0

    def use_tokenizer(self, tokenizer) -> None:
        self._tokens = DenoisingTokens.from_tokenizer(tokenizer)

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        if self._tokens is None:
            raise ValueError(f"{self.key} needs the tokenizer for its {self.control_tokens}: call "
                             "method.use_tokenizer(tokenizer) before training")

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        self._step = step

    def tokens_for(self, batch: torch.Tensor, step: int) -> DenoisingTokens:
        """The control tokens, after checking that ``batch`` holds none of them (a text that
        contains one would be read as structure)."""
        if self._tokens is None:
            raise ValueError(f"{self.key}: call use_tokenizer(tokenizer) first")
        self._tokens.check_absent(batch, f"{self.key} (step {step})")
        return self._tokens
