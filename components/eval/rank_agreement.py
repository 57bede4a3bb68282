"""Do early checkpoints rank runs as their final models do? (The Fine Line, Yang et al. 2024)

The paper argues that capabilities measured on intermediate checkpoints predict final ability.
Here that becomes a test on a recipe's own runs: for one capability (a per-model metric such as
``loss_prose``), rank the runs by their checkpoint at fraction ``at`` of training and by their
final model, and measure Spearman's rho between the two rankings. Reported beside rho:

- ``spearman_low``/``spearman_high``: a 95% percentile-bootstrap interval (runs resampled with
  replacement; a resample whose scores are all tied has no rho and is dropped, and counted);
- ``null_q95`` and ``p_value``: rho's permutation distribution when the early scores carry no
  information (early scores shuffled across runs), its 95th percentile and the one-sided p;
- ``shuffled_spearman``: rho for one seeded shuffle of the early scores, the "random ranking"
  control a claim can put in rho's place (it clears ``null_q95`` with probability 5%).

Spearman's rho ignores the metric's direction (both rankings use the same one), so a loss and
an accuracy need no flag. Ties get average ranks, as in ``scipy.stats.spearmanr``.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy import stats

from components.registry import MethodParams


class RankAgreementSpec(MethodParams):
    """Spearman agreement between ``metric`` at fraction ``at`` of training and at the end, across
    ``models`` (evaluated models whose training stage kept a checkpoint at ``at``). Claimable as
    ``<name>.spearman``, ``_low``, ``_high``, ``null_q95``, ``p_value``, ``shuffled_spearman``."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="the agreement's name in claims and reports")
    metric: str = Field(min_length=1, description="the capability: a per-model metric, e.g. loss_prose")
    models: list[str] = Field(min_length=4, description="the runs ranked (at least 4: with 3, no ranking clears "
                                                        "a 5% permutation test)")
    at: float = Field(0.3, gt=0.0, lt=1.0, description="the early checkpoint's fraction of training")
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for the interval (0: none)")
    permutations: int = Field(20000, ge=100, description="shuffles for the permutation null")
    seed: int = 0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; NaN when either side is all ties."""
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_agreement(early: list[float], final: list[float], bootstrap: int = 2000, permutations: int = 20000,
                   seed: int = 0) -> dict[str, float]:
    """Spearman's rho between ``early`` and ``final`` scores of the same runs, its bootstrap
    interval, and its permutation null (see the module docstring)."""
    early_a, final_a = np.asarray(early, dtype=float), np.asarray(final, dtype=float)
    if early_a.shape != final_a.shape or early_a.ndim != 1:
        raise ValueError(f"rank_agreement needs two equal-length lists, got {early_a.shape} and {final_a.shape}")
    if len(early_a) < 4:
        raise ValueError(f"rank_agreement needs at least 4 runs, got {len(early_a)}")
    if not (np.isfinite(early_a).all() and np.isfinite(final_a).all()):
        raise ValueError("rank_agreement: a score is not finite (a run diverged?); early "
                         f"{early_a.tolist()}, final {final_a.tolist()}")
    rng = np.random.default_rng(seed)
    rho = spearman(early_a, final_a)
    n = len(early_a)

    rank_early, rank_final = stats.rankdata(early_a), stats.rankdata(final_a)
    shuffled = rng.permuted(np.tile(rank_early, (permutations, 1)), axis=1)
    null = _row_correlations(shuffled, rank_final)
    null = null[np.isfinite(null)]
    out = {"spearman": rho, "n_runs": float(n),
           "null_q95": float(np.quantile(null, 0.95)) if len(null) else float("nan"),
           "p_value": float((1 + np.sum(null >= rho)) / (1 + len(null))) if np.isfinite(rho) else float("nan"),
           "shuffled_spearman": spearman(rng.permutation(early_a), final_a)}

    low = high = float("nan")
    dropped = 0
    if bootstrap:
        rhos = []
        for _ in range(bootstrap):
            idx = rng.integers(0, n, n)
            r = spearman(early_a[idx], final_a[idx])
            if np.isfinite(r):
                rhos.append(r)
            else:
                dropped += 1
        if rhos:
            low, high = (float(q) for q in np.quantile(rhos, [0.025, 0.975]))
    out.update({"spearman_low": low, "spearman_high": high, "bootstrap_dropped": float(dropped)})
    return out


def _row_correlations(rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``rows`` with ``ranks`` (rho, on ranks)."""
    x = rows - rows.mean(axis=1, keepdims=True)
    y = ranks - ranks.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x @ y) / (np.sqrt((x * x).sum(axis=1)) * np.sqrt((y * y).sum()))


def agreement_scores(spec: RankAgreementSpec, per_model: dict[str, dict],
                     label) -> tuple[list[float], list[float]]:
    """(early, final) ``spec.metric`` of each run; ``label(model, fraction)`` names a kept
    checkpoint's scores. A missing model, checkpoint or metric names itself."""
    early, final = [], []
    for model in spec.models:
        checkpoint = label(model, spec.at)
        for name in (model, checkpoint):
            if name not in per_model:
                hint = (f"; give the model's training stage keep_checkpoints: [{spec.at}] and this stage "
                        "checkpoints: true" if name == checkpoint else "")
                raise ValueError(f"rank agreement {spec.name}: needs scores of {name!r}, which this evaluate stage "
                                 f"did not produce{hint}; scored: {', '.join(sorted(per_model))}")
            if spec.metric not in per_model[name]:
                raise ValueError(f"rank agreement {spec.name}: metric {spec.metric!r} is not a metric of {name}")
        early.append(float(per_model[checkpoint][spec.metric]))
        final.append(float(per_model[model][spec.metric]))
    return early, final
