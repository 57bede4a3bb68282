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

The same test serves any two per-model metrics (``MetricCorrelationSpec``): e.g. flatness
against a downstream probe (Liu et al. 2023, "Same Pre-training Loss, Better Downstream"). Such a
correlation can hold other metrics fixed (``given``): rho is then the partial Spearman
correlation, the correlation of the two rankings after each is regressed on the others' ranks,
so "at roughly equal loss" is a computation rather than a hope. Its null shuffles the first
metric and residualizes each shuffle the same way.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator, model_validator
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

    def runs(self) -> list[str]:
        return list(self.models)


class MetricCorrelationSpec(MethodParams):
    """Spearman correlation between metric ``x`` of ``models`` and metric ``y`` of ``y_models``
    (paired by position; default the same models), optionally holding the ``given`` metrics of
    ``models`` fixed (partial rho). Claimable as ``<name>.spearman`` and the rest, as a rank
    agreement, plus ``raw_spearman`` with ``given``, and ``given_spread`` (max - min) with one."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="the correlation's name in claims and reports")
    x: str = Field(min_length=1, description="a per-model metric of `models`, e.g. hessian_trace")
    y: str = Field(min_length=1, description="a per-model metric of `y_models`, e.g. loss_arithmetic")
    models: list[str] = Field(min_length=4, description="the runs (at least 4, as for a rank agreement)")
    y_models: list[str] | None = Field(None, description="where y is read, paired with `models` by position "
                                                         "(e.g. each run's downstream fine-tune); default `models`")
    given: list[str] = Field(default_factory=list, description="metrics of `models` held fixed (one name or a "
                             "list): rho becomes the partial Spearman correlation (e.g. the upstream loss, for 'at "
                             "equal loss')")
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for the interval (0: none)")
    permutations: int = Field(20000, ge=100, description="shuffles of x for the permutation null")
    seed: int = 0

    @field_validator("given", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _pairs_match(self):
        if self.y_models is not None and len(self.y_models) != len(self.models):
            raise ValueError(f"y_models pairs with models by position: {len(self.y_models)} y_models for "
                             f"{len(self.models)} models")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.models, self.y_models or self.models))

    def runs(self) -> list[str]:
        """Every run read, each once, in order."""
        return list(dict.fromkeys(run for pair in self.pairs() for run in pair))


def _residual_ranks(ranks: np.ndarray, given_ranks: np.ndarray | None) -> np.ndarray:
    """Ranks (one run per column; rows are alternatives) centred, and with ``given_ranks`` (one
    row per metric held fixed) regressed out: what partial Spearman correlates."""
    if given_ranks is None:
        return ranks - ranks.mean(axis=-1, keepdims=True)
    design = np.column_stack([np.ones(given_ranks.shape[1]), given_ranks.T])
    projection = design @ np.linalg.pinv(design)
    return ranks - ranks @ projection


def _ranks_of(given: np.ndarray | None) -> np.ndarray | None:
    return None if given is None else stats.rankdata(np.atleast_2d(given), axis=1)


def spearman(a: np.ndarray, b: np.ndarray, given: np.ndarray | None = None) -> float:
    """Spearman's rho, or its partial form holding ``given`` (one metric, or one row per metric)
    fixed; NaN when a side, or a metric held fixed, is all ties."""
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    rz = _ranks_of(given)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0 or (rz is not None and (np.ptp(rz, axis=1) == 0).any()):
        return float("nan")
    return float(_row_correlations(_residual_ranks(ra[None], rz), _residual_ranks(rb, rz))[0])


def rank_agreement(early: list[float], final: list[float], bootstrap: int = 2000, permutations: int = 20000,
                   seed: int = 0, given: list | None = None) -> dict[str, float]:
    """Spearman's rho between ``early`` and ``final`` scores of the same runs (partial, holding
    ``given`` fixed: one list of scores, or one per metric), its bootstrap interval, and its
    permutation null (see the module docstring)."""
    early_a, final_a = np.asarray(early, dtype=float), np.asarray(final, dtype=float)
    given_a = None if given is None else np.atleast_2d(np.asarray(given, dtype=float))
    if early_a.shape != final_a.shape or early_a.ndim != 1 or (given_a is not None
                                                              and given_a.shape[1:] != early_a.shape):
        raise ValueError(f"rank_agreement needs equal-length lists, got {early_a.shape} and {final_a.shape}"
                         + ("" if given_a is None else f" and {given_a.shape}"))
    if len(early_a) < 4:
        raise ValueError(f"rank_agreement needs at least 4 runs, got {len(early_a)}")
    if not all(np.isfinite(v).all() for v in (early_a, final_a, *([] if given_a is None else [given_a]))):
        raise ValueError("rank_agreement: a score is not finite (a run diverged?); early "
                         f"{early_a.tolist()}, final {final_a.tolist()}"
                         + ("" if given_a is None else f", given {given_a.tolist()}"))
    rng = np.random.default_rng(seed)
    rho = spearman(early_a, final_a, given_a)
    n = len(early_a)

    rank_given = _ranks_of(given_a)
    rank_early, rank_final = stats.rankdata(early_a), stats.rankdata(final_a)
    shuffled = rng.permuted(np.tile(rank_early, (permutations, 1)), axis=1)
    null = _row_correlations(_residual_ranks(shuffled, rank_given), _residual_ranks(rank_final, rank_given))
    null = null[np.isfinite(null)]
    out = {"spearman": rho, "n_runs": float(n),
           "null_q95": float(np.quantile(null, 0.95)) if len(null) else float("nan"),
           "p_value": float((1 + np.sum(null >= rho)) / (1 + len(null))) if np.isfinite(rho) else float("nan"),
           "shuffled_spearman": spearman(rng.permutation(early_a), final_a, given_a)}
    if given_a is not None:
        out["raw_spearman"] = spearman(early_a, final_a)
        if len(given_a) == 1:
            out["given_spread"] = float(np.ptp(given_a))

    low = high = float("nan")
    dropped = 0
    if bootstrap:
        rhos = []
        for _ in range(bootstrap):
            idx = rng.integers(0, n, n)
            r = spearman(early_a[idx], final_a[idx], None if given_a is None else given_a[:, idx])
            if np.isfinite(r):
                rhos.append(r)
            else:
                dropped += 1
        if rhos:
            low, high = (float(q) for q in np.quantile(rhos, [0.025, 0.975]))
    out.update({"spearman_low": low, "spearman_high": high, "bootstrap_dropped": float(dropped)})
    return out


def _row_correlations(rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``rows`` with ``ranks`` (rho, on ranks); inputs centred
    already (``_residual_ranks``) stay as they are."""
    x = rows - rows.mean(axis=1, keepdims=True)
    y = ranks - ranks.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((x @ y) / (np.sqrt((x * x).sum(axis=1)) * np.sqrt((y * y).sum())), -1.0, 1.0)


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


def correlation_scores(spec: MetricCorrelationSpec, per_model: dict[str, dict]
                       ) -> tuple[list[float], list[float], list[float] | None]:
    """(x, y, given or None: one list per metric held fixed) of each pair of ``spec``; a missing
    model or metric names itself."""
    def read(model: str, metric: str) -> float:
        if model not in per_model:
            raise ValueError(f"correlation {spec.name}: needs scores of {model!r}, which this evaluate stage did not "
                             f"produce; scored: {', '.join(sorted(per_model))}")
        if metric not in per_model[model]:
            raise ValueError(f"correlation {spec.name}: metric {metric!r} is not a metric of {model}")
        return float(per_model[model][metric])

    pairs = spec.pairs()
    x = [read(m, spec.x) for m, _ in pairs]
    y = [read(m, spec.y) for _, m in pairs]
    given = [[read(m, metric) for m, _ in pairs] for metric in spec.given] or None
    return x, y, given
