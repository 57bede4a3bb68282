"""Scaling-law fits shared by every recipe that measures one: Chinchilla-form power laws with
bootstrap intervals.

Laws (``LAWS``), each ``E`` plus power-law terms in positive variables:
- ``power``: ``L(x) = E + A x^-alpha`` (one variable: parameters, average parameters under a
  sparsity schedule, tokens, bits, ...);
- ``chinchilla``: ``L(N, D) = E + A N^-alpha + B D^-beta`` (Hoffmann et al. 2022, eq. 2).

The fit is Chinchilla's (Hoffmann et al. 2022, appendix D.2): parameters ``a = log A``,
``b = log B``, ``e = log E``, and the Huber loss (delta 1e-3) of
``LSE(a - alpha log N, b - beta log D, e) - log L`` minimised with L-BFGS from a grid of starting
points (L-BFGS from the 8 starts of lowest loss), keeping the best. Fitting in log space weighs every point by its relative error, and the
Huber loss keeps one outlier from steering the fit. Intervals are percentile bootstrap intervals:
the points are resampled with replacement and refitted (the full fit's optimum is one of the
starts), ``bootstrap`` times with a fixed seed. With a handful of points they are wide, and they
say so; a law needs at least one point more than it has parameters, so residuals exist.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field, field_validator, model_validator

from components.registry import MethodParams

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class Law:
    name: str
    variables: tuple[str, ...]
    formula: str

    @property
    def params(self) -> tuple[str, ...]:
        """E, then a scale and an exponent per variable: (E, A, alpha) or (E, A, alpha, B, beta)."""
        names = ("E",)
        for scale, exponent in list(zip("AB", ("alpha", "beta")))[: len(self.variables)]:
            names += (scale, exponent)
        return names

    def predict(self, params: dict[str, float], x: dict[str, np.ndarray]) -> np.ndarray:
        out = np.full(np.shape(x[self.variables[0]]), params["E"], dtype=float)
        for variable, (scale, exponent) in zip(self.variables, zip("AB", ("alpha", "beta"))):
            out = out + params[scale] * np.asarray(x[variable], dtype=float) ** -params[exponent]
        return out


LAWS = {law.name: law for law in (
    Law("power", ("x",), "L = E + A x^-alpha"),
    Law("chinchilla", ("N", "D"), "L = E + A N^-alpha + B D^-beta"),
)}


@dataclass
class ScalingFitResult:
    law: str
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # 95% percentile bootstrap
    log_residuals: list[float]  # log L_measured - log L_fitted, per point in input order
    rmse_log: float
    n_points: int
    bootstrap: int
    failed_refits: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"law": self.law, "formula": LAWS[self.law].formula, "params": self.params,
                "intervals_95": {k: list(v) for k, v in self.intervals.items()},
                "log_residuals": self.log_residuals, "rmse_log": self.rmse_log, "n_points": self.n_points,
                "bootstrap": self.bootstrap, "failed_refits": self.failed_refits}


class ScalingFitError(ValueError):
    """Points that cannot determine the law (too few, non-positive, non-finite)."""


def _huber_terms(r: np.ndarray) -> np.ndarray:
    """The Huber loss of each residual (any shape)."""
    return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _huber(r: np.ndarray) -> tuple[float, np.ndarray]:
    grad = np.where(np.abs(r) <= HUBER_DELTA, r, HUBER_DELTA * np.sign(r))
    return float(_huber_terms(r).sum()), grad


def _objective(theta: np.ndarray, logs: np.ndarray, log_y: np.ndarray) -> tuple[float, np.ndarray]:
    """theta = (e, a_1, alpha_1, a_2, alpha_2, ...); logs: [n_vars, n_points] of log x."""
    e, pairs = theta[0], theta[1:].reshape(-1, 2)
    terms = np.vstack([np.full(log_y.shape, e)] + [a - alpha * lx for (a, alpha), lx in zip(pairs, logs)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    lse = top + np.log(weights.sum(axis=0))
    loss, dr = _huber(lse - log_y)
    soft = weights / weights.sum(axis=0)  # d lse / d term
    grad = [float((dr * soft[0]).sum())]
    for (a, alpha), lx, s in zip(pairs, logs, soft[1:]):
        grad += [float((dr * s).sum()), float((dr * s * -lx).sum())]
    return loss, np.asarray(grad)


def _starts(n_vars: int) -> np.ndarray:
    """Chinchilla-style grid of starting points [n_starts, 1 + 2 n_vars]: e, then (a, alpha) per variable."""
    es, scales, exponents = (-1.0, 0.0, 0.5, 1.0, 1.5), (0.0, 5.0, 10.0, 15.0, 20.0), (0.0, 0.5, 1.0, 2.0)
    return np.asarray(list(itertools.product(es, *([scales, exponents] * n_vars))), dtype=float)


def _grid_losses(thetas: np.ndarray, logs: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """The objective at many starting points at once (no gradient)."""
    pairs = thetas[:, 1:].reshape(len(thetas), -1, 2)  # [S, vars, (a, alpha)]
    terms = np.concatenate([np.repeat(thetas[:, None, :1], log_y.size, axis=2),
                            pairs[..., :1] - pairs[..., 1:] * logs[None]], axis=1)  # [S, 1 + vars, points]
    return _huber_terms(np.logaddexp.reduce(terms, axis=1) - log_y).sum(axis=1)


def _minimise(logs: np.ndarray, log_y: np.ndarray, starts: np.ndarray, keep: int = 8) -> np.ndarray | None:
    """L-BFGS from the ``keep`` starts of lowest loss; the loss is scaled by 1/delta so that
    L-BFGS's tolerances do not stop it on the Huber loss's small values."""
    from scipy.optimize import minimize

    def scaled(theta):
        loss, grad = _objective(theta, logs, log_y)
        return loss / HUBER_DELTA, grad / HUBER_DELTA

    best, best_loss = None, math.inf
    for start in starts[np.argsort(_grid_losses(starts, logs, log_y))[:keep]]:
        r = minimize(scaled, start, jac=True, method="L-BFGS-B",
                     options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
        if np.all(np.isfinite(r.x)) and r.fun < best_loss:
            best, best_loss = r.x, r.fun
    return best


def _exp(v: float) -> float:
    """exp that saturates to inf: a degenerate refit can drive a log-scale past float range."""
    return math.exp(v) if v < 709.0 else math.inf


def _as_params(law: Law, theta: np.ndarray) -> dict[str, float]:
    values = [_exp(theta[0])]
    for a, alpha in theta[1:].reshape(-1, 2):
        values += [_exp(a), float(alpha)]
    return dict(zip(law.params, values))


def _log_prediction(theta: np.ndarray, logs: np.ndarray) -> np.ndarray:
    """log L of the law at ``theta``, in log space (finite where the scales themselves overflow)."""
    pairs = theta[1:].reshape(-1, 2)
    terms = np.vstack([np.full(logs.shape[1], theta[0])] + [a - alpha * lx for (a, alpha), lx in zip(pairs, logs)])
    return np.logaddexp.reduce(terms, axis=0)


def fit_scaling_law(law_name: str, x: dict[str, list[float]], y: list[float], bootstrap: int = 200,
                    seed: int = 0, where: str = "scaling fit") -> ScalingFitResult:
    """Fit ``law_name`` to points ``(x[var][i], y[i])``; ``where`` names the fit in errors."""
    if law_name not in LAWS:
        raise ScalingFitError(f"{where}: unknown law {law_name!r}; known laws: {', '.join(sorted(LAWS))}")
    law = LAWS[law_name]
    if sorted(x) != sorted(law.variables):
        raise ScalingFitError(f"{where}: the {law.name} law ({law.formula}) needs the variables "
                              f"{list(law.variables)}, got {sorted(x)}")
    values = np.asarray([x[v] for v in law.variables], dtype=float)
    y_values = np.asarray(y, dtype=float)
    n, k = y_values.size, len(law.params)
    if values.shape != (len(law.variables), n):
        raise ScalingFitError(f"{where}: every variable needs one value per point ({n} points)")
    if n < k + 1:
        raise ScalingFitError(f"{where}: {n} points cannot fit the {k} parameters of the {law.name} law "
                              f"({law.formula}) with residuals left to judge it; give at least {k + 1}")
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(y_values))):
        raise ScalingFitError(f"{where}: the points contain nan or inf")
    if np.any(values <= 0) or np.any(y_values <= 0):
        raise ScalingFitError(f"{where}: a power law needs positive variables and losses")
    logs, log_y = np.log(values), np.log(y_values)
    theta = _minimise(logs, log_y, _starts(len(law.variables)))
    params = _as_params(law, theta)
    residuals = log_y - _log_prediction(theta, logs)

    rng = np.random.default_rng(seed)
    samples, failed = [], 0
    refit_starts = np.vstack([theta[None], _starts(len(law.variables))])
    for _ in range(bootstrap):
        pick = rng.integers(0, n, size=n)
        if np.unique(pick).size < k:  # a resample with too few distinct points determines nothing
            failed += 1
            continue
        refit = _minimise(logs[:, pick], log_y[pick], refit_starts, keep=3)
        sample = None if refit is None else [_as_params(law, refit)[p] for p in law.params]
        if sample is None or not all(math.isfinite(v) for v in sample):  # diverged: a scale past float range
            failed += 1
            continue
        samples.append(sample)
    if samples:
        table = np.asarray(samples)
        intervals = {p: (float(np.percentile(table[:, i], 2.5)), float(np.percentile(table[:, i], 97.5)))
                     for i, p in enumerate(law.params)}
    else:
        intervals = {p: (math.nan, math.nan) for p in law.params}
    return ScalingFitResult(law=law.name, params=params, intervals=intervals,
                            log_residuals=[float(r) for r in residuals],
                            rmse_log=float(np.sqrt(np.mean(residuals ** 2))), n_points=n, bootstrap=bootstrap,
                            failed_refits=failed)


# --------------------------------------------------------------------------- in an evaluate stage


class ScalingFitSpec(MethodParams):
    """A law fitted across evaluated models: ``metric`` of each model in ``models`` against the
    law's variables, each given as a per-model metric name (e.g. ``train_tokens``) or as a
    ``{model: value}`` mapping. The fit's parameters become claimable metrics ``<name>.<param>``
    (with ``<param>_low``/``<param>_high``, the 95% interval, and ``rmse_log``)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="the fit's name in claims and files")
    law: str = Field(description=f"one of {', '.join(sorted(LAWS))}")
    metric: str = Field(min_length=1, description="per-model metric fitted, e.g. loss_all (must be positive)")
    models: list[str] = Field(min_length=2, description="evaluated models that are the fit's points")
    variables: dict[str, str | dict[str, float]] = Field(description="law variable -> per-model metric name "
                                                                     "or {model: value}")
    bootstrap: int = Field(200, ge=0, description="bootstrap refits for the intervals (0: none)")
    seed: int = 0

    @field_validator("law")
    @classmethod
    def _known_law(cls, value: str) -> str:
        if value not in LAWS:
            raise ValueError(f"unknown law {value!r}; known laws: {', '.join(sorted(LAWS))}")
        return value

    @model_validator(mode="after")
    def _variables_match_the_law(self):
        law = LAWS[self.law]
        if sorted(self.variables) != sorted(law.variables):
            raise ValueError(f"variables {sorted(self.variables)} do not match the {law.name} law's "
                             f"{list(law.variables)} ({law.formula})")
        if len(self.models) < len(law.params) + 1:
            raise ValueError(f"{len(self.models)} models cannot fit the {len(law.params)} parameters of the "
                             f"{law.name} law with residuals left; name at least {len(law.params) + 1}")
        return self


def fit_points(spec: ScalingFitSpec, per_model: dict[str, dict]) -> tuple[dict[str, list[float]], list[float]]:
    """The fit's (variables, metric) per model; a missing model, metric or value names itself."""
    x: dict[str, list[float]] = {v: [] for v in spec.variables}
    y = []
    for model in spec.models:
        if model not in per_model:
            raise ValueError(f"fit {spec.name}: models names {model!r}, which this evaluate stage did not evaluate; "
                             f"evaluated: {', '.join(sorted(per_model))}")
        if spec.metric not in per_model[model]:
            raise ValueError(f"fit {spec.name}: metric {spec.metric!r} is not a metric of {model}")
        y.append(float(per_model[model][spec.metric]))
        for variable, source in spec.variables.items():
            if isinstance(source, str):
                if source not in per_model[model]:
                    raise ValueError(f"fit {spec.name}: variable {variable} reads metric {source!r}, which {model} "
                                     "does not have")
                x[variable].append(float(per_model[model][source]))
            else:
                if model not in source:
                    raise ValueError(f"fit {spec.name}: variables.{variable} gives no value for {model}")
                x[variable].append(float(source[model]))
    return x, y


def claim_metrics(result: ScalingFitResult) -> dict[str, float]:
    """The fit as metrics a claim can name: each parameter, its interval ends, and ``rmse_log``."""
    out = dict(result.params)
    for p, (low, high) in result.intervals.items():
        out[f"{p}_low"], out[f"{p}_high"] = low, high
    out["rmse_log"] = result.rmse_log
    return out


def write_fit_plot(spec: ScalingFitSpec, x: dict[str, list[float]], y: list[float], result: ScalingFitResult,
                   out_dir, title: str):
    """Measured points against the fitted law, on log axes (the first variable on x)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = LAWS[spec.law]
    first = law.variables[0]
    fitted = law.predict(result.params, {v: np.asarray(x[v]) for v in law.variables})
    order = np.argsort(x[first])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(np.asarray(x[first])[order], np.asarray(y)[order], label="measured", zorder=3)
    ax.plot(np.asarray(x[first])[order], fitted[order], marker="x", linestyle="--",
            label=f"fit: {law.formula}, rmse(log) {result.rmse_log:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(first if isinstance(spec.variables[first], dict) else f"{first} ({spec.variables[first]})")
    ax.set_ylabel(spec.metric)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(out_dir) / f"fit_{spec.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
