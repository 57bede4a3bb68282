"""Uniform epochs over all blocks: the trainer's default order (``BatchOrder``), unchanged.

Every epoch is a fresh permutation of all blocks seeded by ``(seed, epoch)``; batches run
across epoch boundaries. A stage without a ``sampler`` option trains exactly like this.
"""
from __future__ import annotations

import numpy as np

from components.registry import MethodParams, Paper
from components.train.samplers.base import Sampler
from components.train.trainer import BatchOrder


class UniformSampler(Sampler):
    """Shuffled full passes over the training blocks (random reshuffling, no replacement)."""

    key = "uniform"
    paper = Paper(
        title="Why Random Reshuffling Beats Stochastic Gradient Descent",
        url="https://arxiv.org/abs/1510.08560",
        arxiv="1510.08560",
    )

    class Params(MethodParams):
        """No params: every block once per epoch."""

    def bind(self, n_blocks, batch_size, seed, skill_ranges=None, validation=None, train_blocks=None) -> None:
        super().bind(n_blocks, batch_size, seed, skill_ranges, validation, train_blocks)
        self._order = BatchOrder(self.n_blocks, self.batch_size, self.seed)

    def indices(self, step_index: int) -> np.ndarray:
        return self._order.indices(step_index)
