"""Gradual magnitude pruning during training: a mask schedule that tightens as training goes.

Zhu & Gupta (2017, "To prune, or not to prune") raise the sparsity of every block linear from
``initial_sparsity`` to ``final_sparsity`` along a cubic ramp,
``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3`` for ``t0 <= t <= t1``, pruning the
smallest-magnitude weights every ``prune_every`` steps and at ``t1``; pruned weights stay zero
(their gradients are masked, see ``masking.py``). "The Journey Matters" (Jin et al., 2025)
found that the window ``t0 = 25%`` to ``t1 = 75%`` of training was near-optimal across its
configurations and that the final loss follows a Chinchilla-form law in the *average*
parameter count over training; ``mean_density`` in the facts is that average over the block
linears. [Guess: the Journey paper's code is a TPU MaxText fork we did not read; the window and
the cubic ramp are from its text, per-layer magnitude ranking is Zhu & Gupta's.]

Each block linear is pruned to the same sparsity by ranking its own |w| (ties broken by
position, so the mask is deterministic). A window with ``start_fraction == end_fraction`` is a
one-shot pruning at that step. The masks are method state: saved in every checkpoint and
restored on resume, so a resumed run prunes exactly as an uninterrupted one.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from components.registry import Paper
from components.train.masking import MaskedTraining
from components.train.method import block_linears, forward_flops_per_token


class GradualPruning(MaskedTraining):
    key = "gradual_pruning"
    paper = Paper(title="The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense "
                  "Scaling Laws", url="https://arxiv.org/abs/2501.12486", arxiv="2501.12486")

    class Params(MaskedTraining.Params):
        final_sparsity: float = Field(0.75, gt=0, lt=1, description="Sparsity of every block linear at the end.")
        initial_sparsity: float = Field(0.0, ge=0, lt=1, description="Sparsity the ramp starts from at t0.")
        start_fraction: float = Field(0.25, ge=0, le=1, description="t0 as a fraction of `steps` (the Journey "
                                      "paper's near-optimal window is 0.25 to 0.75).")
        end_fraction: float = Field(0.75, ge=0, le=1, description="t1 as a fraction of `steps`: the final "
                                    "sparsity is reached here and kept to the end.")
        prune_every: int = Field(10, ge=1, description="Steps between mask updates inside the window.")

        @model_validator(mode="after")
        def _window(self):
            if self.start_fraction > self.end_fraction:
                raise ValueError(f"start_fraction={self.start_fraction} is after end_fraction={self.end_fraction}")
            if self.initial_sparsity > self.final_sparsity:
                raise ValueError(f"initial_sparsity={self.initial_sparsity} is above "
                                 f"final_sparsity={self.final_sparsity}: pruning never regrows weights")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self._step = 0

    def window(self) -> tuple[int, int]:
        """(t0, t1) in 1-based optimizer steps; a mask update happens after step t."""
        p = self.params
        return max(1, round(p.start_fraction * p.steps)), max(1, round(p.end_fraction * p.steps))

    def sparsity_at(self, step: int) -> float | None:
        """The sparsity to prune to after ``step``, or None when the mask does not change then."""
        p = self.params
        t0, t1 = self.window()
        if step < t0 or step > t1 or not (step == t1 or (step - t0) % p.prune_every == 0):
            return None
        if t1 == t0:
            return p.final_sparsity
        return p.final_sparsity + (p.initial_sparsity - p.final_sparsity) * (1 - (step - t0) / (t1 - t0)) ** 3

    def mean_density(self) -> float:
        """Block-linear density averaged over the steps (the forward of step t sees the mask that
        the updates after steps < t left), i.e. the Journey paper's average parameter count."""
        density, total = 1.0, 0.0
        for step in range(1, self.params.steps + 1):
            total += density
            s = self.sparsity_at(step)
            if s is not None:
                density = 1.0 - s
        return total / self.params.steps

    def build_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: torch.ones_like(linear.weight, dtype=torch.bool) for name, linear in
                sorted(block_linears(model).items())}

    def on_batch(self, step, indices) -> None:
        self._step = step

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        sparsity = self.sparsity_at(self._step)
        if sparsity is not None:
            linears = block_linears(model)
            for name in self.masks:
                weight = linears[name].weight
                n_zero = round(sparsity * weight.numel())
                order = torch.argsort(weight.abs().flatten(), stable=True)  # smallest first, ties by position
                mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
                mask[order[:n_zero]] = False
                self.masks[name] = mask.view_as(weight)
            self._install(model)  # new gradient hooks and float masks, then zero the pruned weights
        else:
            self._apply()

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """As ``MaskedTraining``, at the density averaged over the schedule (not the final one)."""
        return 3.0 * forward_flops_per_token(model, seq_len, block_density=self.mean_density())

    def finalize(self, model: nn.Module) -> dict:
        t0, t1 = self.window()
        return {**super().finalize(model), "mean_density": self.mean_density(), "prune_start_step": t0,
                "prune_end_step": t1}
