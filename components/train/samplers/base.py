"""Base class of training-data samplers: which rows of ``blocks`` each optimizer step uses.

The shared trainer calls, in order:

- ``bind(n_blocks, batch_size, seed, skill_ranges, validation)`` once, before training;
- ``observe(0, model, autocast)`` once before the first step of a fresh (not resumed) run;
- per step ``k`` (1-based): ``indices(k - 1)``, then forward/backward/optimizer step, then
  ``observe(k, model, autocast)``, whose returned metrics go to ``on_log``;
- ``state()`` into every checkpoint and ``load_state`` on resume;
- ``facts(steps)`` at the end: numbers (keys ``sampler_*``) for the artifact's facts.

``indices(i)`` must be a function of the seed, ``i`` and ``state()`` only, so a resumed run
draws exactly the batches of the uninterrupted one.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from components.registry import Method

SkillRanges = dict[str, tuple[int, int]]  # skill -> [start, stop) rows of the training blocks


class SamplerError(ValueError):
    """A sampler got params or data it cannot work with."""


class Sampler(Method):
    """Decides the block indices of every training step."""

    #: True when the sampler needs ``skill_ranges`` over several domains (all of train.npy).
    needs_skills: bool = False

    def bind(self, n_blocks: int, batch_size: int, seed: int, skill_ranges: SkillRanges | None = None,
             validation: dict[str, np.ndarray] | None = None, train_blocks: np.ndarray | None = None) -> None:
        """Attach the data: ``n_blocks`` training blocks, ``skill_ranges`` partitioning them (in
        row order) and ``validation`` blocks per skill, each ``(n, seq_len)`` integer arrays;
        ``train_blocks``, the training blocks themselves, for samplers that train on them
        outside the run (Skill-it's graph estimation)."""
        if n_blocks < 1 or batch_size < 1:
            raise SamplerError(f"sampler {self.key!r}: need n_blocks >= 1 and batch_size >= 1, "
                               f"got {n_blocks} and {batch_size}")
        if seed < 0:  # numpy seeds must be non-negative
            raise SamplerError(f"sampler {self.key!r}: seed must be >= 0, got {seed}")
        self.n_blocks, self.batch_size, self.seed = int(n_blocks), int(batch_size), int(seed)
        self.skill_ranges = check_skill_ranges(skill_ranges or {}, n_blocks, self.key)
        self.validation = dict(validation or {})
        self.train_blocks = train_blocks

    def indices(self, step_index: int) -> np.ndarray:
        """Rows of ``blocks`` for the update with 0-based index ``step_index``, in batch order."""
        raise NotImplementedError

    def observe(self, step: int, model: torch.nn.Module, autocast) -> dict[str, float]:
        """Called after optimizer step ``step`` (and with step 0 before a fresh run) with the plain
        model in train mode and the trainer's autocast context; returns metrics to log."""
        return {}

    def state(self) -> dict:
        """What must survive a resume: built from lists, ints, floats and strings only."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what ``state`` returned."""
        if state:
            raise SamplerError(f"sampler {self.key!r} keeps no state but the checkpoint has {sorted(state)}")

    def facts(self, steps: int) -> dict:
        """Numbers about the sampling after ``steps`` updates, keys prefixed ``sampler_``."""
        return {}


def check_skill_ranges(skill_ranges: SkillRanges, n_blocks: int, key: str) -> SkillRanges:
    """Skill ranges must tile ``[0, n_blocks)`` in order (as train.npy concatenates domains)."""
    if not skill_ranges:
        return {}
    ranges = {str(name): (int(start), int(stop)) for name, (start, stop) in skill_ranges.items()}
    position = 0
    for name, (start, stop) in ranges.items():
        if start != position or stop < start:
            raise SamplerError(f"sampler {key!r}: skill {name!r} spans rows [{start}, {stop}), expected it to "
                               f"start at row {position}; skill ranges must tile the blocks in order")
        position = stop
    if position != n_blocks:
        raise SamplerError(f"sampler {key!r}: skill ranges cover {position} rows but there are {n_blocks} blocks")
    return ranges


class CycleStream:
    """An endless stream of block indices made of cycles of equal length ``period``: stream
    position ``g`` is ``cycle(g // period)[g % period]``; step ``i`` takes positions
    ``[i * batch_size, (i + 1) * batch_size)``, so the data position is a function of the step."""

    def __init__(self, period: int, cycle: Callable[[int], np.ndarray], batch_size: int):
        self.period, self.cycle, self.batch_size = period, cycle, batch_size
        self._cache: dict[int, np.ndarray] = {}

    def _get(self, index: int) -> np.ndarray:
        if index not in self._cache:
            if len(self._cache) > 2:  # only the current and next cycles are ever needed
                self._cache.pop(min(self._cache))
            self._cache[index] = self.cycle(index)
        return self._cache[index]

    def indices(self, step_index: int) -> np.ndarray:
        positions = np.arange(step_index * self.batch_size, (step_index + 1) * self.batch_size)
        cycles = positions // self.period
        if cycles[0] == cycles[-1]:
            return self._get(int(cycles[0]))[positions % self.period]
        return np.array([self._get(int(c))[p % self.period] for c, p in zip(cycles, positions)])


def subset_size(fraction: float, n_blocks: int) -> int:
    """Blocks per epoch for a data fraction: ``round(fraction * n)`` as RS2's ``coreset_size``, at least 1."""
    return max(1, min(n_blocks, round(fraction * n_blocks)))
