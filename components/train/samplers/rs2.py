"""RS2: repeated random sampling, a fresh random ``fraction`` of the data every epoch.

Follows the reference code (PatrikOkanovic/RS2, DeepCore ``UniformNoReplacement`` with
``--per_epoch True``; README example ``--fraction 0.1``): shuffle all blocks once, train each
epoch on the next chunk of ``round(fraction * n)`` blocks (shuffled again inside the epoch, as
the reference's ``DataLoader(shuffle=True)``), and reshuffle when the chunks run out, so every
block is used once per ``ceil(1 / fraction)`` epochs ("a round") and never twice in a round.
``replacement: true`` is the paper's RS2-with-replacement: each epoch's subset is drawn
independently (DeepCore ``Uniform`` with ``--per_epoch``).

Deviations: the last chunk of a round holds only the remaining blocks (the reference wraps it
around to the start of the same permutation, repeating a few blocks, and its ``% (n + 1)``
arithmetic makes that chunk short anyway); batches run across epoch boundaries. Measured in
the stream of blocks, RS2 without replacement is plain reshuffled training at a finer
granularity; what the paper varies is the budget (fewer total steps) and the learning-rate
schedule over it, which here are the stage's ``steps`` and schedule params.
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from components.registry import MethodParams, Paper
from components.train.samplers.base import CycleStream, Sampler, subset_size

_TAG = 2  # separates this sampler's random streams from the trainer's (seed, epoch) ones


class Rs2Sampler(Sampler):
    """Each epoch trains on a new random ``fraction`` of the blocks, without replacement across epochs."""

    key = "rs2"
    paper = Paper(
        title="Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning",
        url="https://arxiv.org/abs/2305.18424",
        arxiv="2305.18424",
    )

    class Params(MethodParams):
        fraction: float = Field(0.1, gt=0, le=1, description="Fraction of the training blocks per epoch "
                                                             "(round(fraction * n), at least 1); README: 0.1.")
        replacement: bool = Field(False, description="Draw each epoch's subset independently (RS2 with "
                                                     "replacement) instead of taking chunks of one shuffle.")

    def bind(self, n_blocks, batch_size, seed, skill_ranges=None, validation=None, train_blocks=None) -> None:
        super().bind(n_blocks, batch_size, seed, skill_ranges, validation, train_blocks)
        self.epoch_blocks = subset_size(self.params.fraction, self.n_blocks)
        self.epochs_per_round = math.ceil(self.n_blocks / self.epoch_blocks)
        if self.params.replacement:  # one cycle = one epoch's subset
            self._stream = CycleStream(self.epoch_blocks, self._independent_epoch, self.batch_size)
        else:  # one cycle = one round: the chunks of one permutation, each shuffled
            self._stream = CycleStream(self.n_blocks, self._round, self.batch_size)

    def _round(self, round_index: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, _TAG, round_index]).permutation(self.n_blocks)
        for chunk, start in enumerate(range(0, self.n_blocks, self.epoch_blocks)):
            stop = min(start + self.epoch_blocks, self.n_blocks)
            inner = np.random.default_rng([self.seed, _TAG, round_index, chunk + 1]).permutation(stop - start)
            order[start:stop] = order[start:stop][inner]
        return order

    def _independent_epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _TAG, epoch, 0])
        return rng.choice(self.n_blocks, size=self.epoch_blocks, replace=False)

    def indices(self, step_index: int) -> np.ndarray:
        return self._stream.indices(step_index)

    def facts(self, steps: int) -> dict:
        seen = steps * self.batch_size
        if self.params.replacement:
            used = np.zeros(self.n_blocks, dtype=bool)
            for epoch in range(math.ceil(seen / self.epoch_blocks)):
                used[self._independent_epoch(epoch)[: seen - epoch * self.epoch_blocks]] = True
            unique = int(used.sum())
        else:
            unique = min(seen, self.n_blocks)
        return {"sampler_fraction": self.params.fraction, "sampler_epoch_blocks": self.epoch_blocks,
                "sampler_epochs": seen / self.epoch_blocks, "sampler_epochs_per_round": self.epochs_per_round,
                "sampler_unique_blocks": unique}
