"""Training stability across a sweep of runs: which runs diverged or spiked, per group of runs
(e.g. one number format swept over learning rates and seeds), as in "To FP8 and Back Again:
Quantifying Reduced Precision Effects on LLM Training Stability" (Lee et al. 2024, arXiv 2405.18710).

Every training stage records, from its per-step losses (``tasks/train.py``):
- ``stability_diverged`` (1 when the loss became nan/inf and ``on_nonfinite: stop`` ended the run);
- ``stability_loss_spike``: the largest rise of the loss, smoothed by a trailing mean over
  ``SPIKE_WINDOW`` steps, above its lowest earlier value, relative to that value, counted after
  the warmup (a loss that climbs back up from where it had been);
- ``stability_lr``: the run's peak learning rate, the grid's axis.

A run is unstable when it diverged or its spike exceeds the group's ``spike_tolerance``.

Guessed, not read: the paper's own instability criterion and its loss-landscape sharpness metric
(a new one for autoregressive LMs) were not available here (only the abstract was), so neither
is reproduced; the project's Hutchinson Hessian trace (``hessian_trace_probes``) is a different,
classical sharpness measure.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SPIKE_WINDOW = 10  # steps in the trailing mean: one noisy batch is not a spike


def loss_spike(losses: Sequence[float], warmup_steps: int, window: int = SPIKE_WINDOW) -> float:
    """max over steps t after warmup of smoothed[t] / min(smoothed[:t]) - 1 (0 when the loss only
    fell); smoothed is the trailing mean over ``window`` steps. Non-finite losses are not passed in:
    the trainer stops before recording one."""
    values = np.asarray(losses, dtype=np.float64)
    if len(values) == 0:
        return 0.0
    kernel = np.ones(min(window, len(values))) / min(window, len(values))
    smoothed = np.convolve(values, kernel, mode="valid")  # smoothed[i] ends at step i + window
    offset = len(values) - len(smoothed)
    lowest_before = np.minimum.accumulate(smoothed)[:-1]
    rises = smoothed[1:] / np.maximum(lowest_before, 1e-12) - 1.0
    counted = np.arange(1, len(smoothed)) + offset >= warmup_steps
    return float(max(0.0, rises[counted].max())) if counted.any() else 0.0


class StabilitySpec(BaseModel):
    """One group of runs (e.g. a number format over learning rates and seeds)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    models: list[str] = Field(min_length=1)
    spike_tolerance: float = Field(0.1, gt=0, description="a run whose smoothed loss rose more than this share "
                                   "above its earlier minimum is unstable")

    def runs(self) -> list[str]:
        return list(self.models)


def group_stability(spec: StabilitySpec, per_model: dict[str, dict]) -> dict:
    """``runs``, ``unstable``, ``unstable_fraction``, ``diverged_fraction`` and ``mean_loss_spike`` of
    the group, and each run's verdict under ``runs_detail``."""
    missing = [m for m in spec.models if m not in per_model]
    if missing:
        raise ValueError(f"models {missing} are not among the evaluated models")
    detail = {}
    for name in spec.models:
        metrics = per_model[name]
        if "stability_loss_spike" not in metrics:
            raise ValueError(f"model {name!r} has no stability facts (not a training stage's model)")
        diverged = bool(metrics.get("stability_diverged", 0))
        spike = float(metrics["stability_loss_spike"])
        detail[name] = {"lr": metrics.get("stability_lr"), "diverged": diverged, "loss_spike": spike,
                        "unstable": diverged or spike > spec.spike_tolerance}
    runs = len(detail)
    unstable = sum(d["unstable"] for d in detail.values())
    return {"runs": runs, "unstable": unstable, "unstable_fraction": unstable / runs,
            "diverged_fraction": sum(d["diverged"] for d in detail.values()) / runs,
            "mean_loss_spike": float(np.mean([d["loss_spike"] for d in detail.values()])),
            "runs_detail": detail}


def claim_values(summary: dict) -> dict[str, float]:
    """The claimable numbers of a group (``<group>.unstable_fraction`` and the rest)."""
    return {k: float(v) for k, v in summary.items() if k != "runs_detail"}
