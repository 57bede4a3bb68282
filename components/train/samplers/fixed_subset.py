"""A static random subset: the baseline RS2 is compared against.

One random ``fraction`` of the blocks is drawn once (seeded by ``seed``) and every epoch is a
fresh shuffle of that same subset: the paper's static random-subset baseline, as DeepCore's
``Uniform`` selection run once before training in the RS2 repository (PatrikOkanovic/RS2),
whose shuffling DataLoader then iterates the subset every epoch. Follows the code, except that
batches run across epoch boundaries (the reference's DataLoader ends an epoch with a short batch).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from components.registry import MethodParams, Paper
from components.train.samplers.base import CycleStream, Sampler, subset_size

_TAG = 1  # separates this sampler's random streams from the trainer's (seed, epoch) ones


class FixedSubsetSampler(Sampler):
    """Trains only on one fixed random ``fraction`` of the blocks, reshuffled every epoch."""

    key = "fixed_subset"
    paper = Paper(
        title="Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning",
        url="https://arxiv.org/abs/2305.18424",
        arxiv="2305.18424",
    )

    class Params(MethodParams):
        fraction: float = Field(0.1, gt=0, le=1, description="Fraction of the training blocks in the fixed "
                                                             "subset (round(fraction * n), at least 1).")

    def bind(self, n_blocks, batch_size, seed, skill_ranges=None, validation=None, train_blocks=None) -> None:
        super().bind(n_blocks, batch_size, seed, skill_ranges, validation, train_blocks)
        self.subset_blocks = subset_size(self.params.fraction, self.n_blocks)
        self.subset = np.random.default_rng([self.seed, _TAG]).permutation(self.n_blocks)[: self.subset_blocks]
        self._stream = CycleStream(self.subset_blocks, self._epoch, self.batch_size)

    def _epoch(self, epoch: int) -> np.ndarray:
        return self.subset[np.random.default_rng([self.seed, _TAG, epoch]).permutation(self.subset_blocks)]

    def indices(self, step_index: int) -> np.ndarray:
        return self._stream.indices(step_index)

    def facts(self, steps: int) -> dict:
        seen = steps * self.batch_size
        return {"sampler_fraction": self.params.fraction, "sampler_epoch_blocks": self.subset_blocks,
                "sampler_epochs": seen / self.subset_blocks, "sampler_unique_blocks": min(seen, self.subset_blocks)}
