"""Scaling-law fits shared by every recipe that measures one: Chinchilla-form power laws with
bootstrap intervals.

A law (``LAWS``) is ``E`` plus terms; each term is a scale times a product of factors
``f(x)^-exponent``, where ``f(x)`` is the variable itself, the variable plus a shift, or its log2,
and the exponent is fitted or fixed at -1 (the factor enters as ``f(x)``):
- ``constant``: ``L = E`` (no variable: the trivial baseline a law must beat on held-out points);
- ``power``: ``L(x) = E + A x^-alpha`` (one variable: parameters, average parameters under a
  sparsity schedule, tokens, bits, ...);
- ``chinchilla``: ``L(N, D) = E + A N^-alpha + B D^-beta`` (Hoffmann et al. 2022, eq. 2);
- ``fp_format``: ``L(B, Ex, M) = E + K log2(B) / ((Ex + 0.5)^delta (M + 0.5)^nu)``, the format
  term of Sun et al. 2025 ("Scaling Laws for Floating-Point Quantization Training", arXiv
  2501.02423, eq. 1) at one model size and one data size, where its ``D^beta / (N^alpha gamma)``
  is the constant ``K`` and its Chinchilla terms are ``E``. Ex and M are the exponent and
  mantissa bits, B the block of elements sharing a scale. The paper's optimal split of P bits
  (eq. 19), ``Ex = delta P / (delta + nu) - 0.5`` and ``M = nu P / (delta + nu) - 0.5``, is reported
  for P = 4 and 8 (``exp_bits_opt_p4`` ...; with P = Ex + M + 1, the sign bit included).

The fit is Chinchilla's (Hoffmann et al. 2022, appendix D.2): in logs of the scales (``e = log E``,
``a = log A``, ...), the Huber loss (delta 1e-3) of ``LSE(e, a - alpha log N, ...) - log L`` is
minimised with L-BFGS from a grid of starting points (L-BFGS from the 8 starts of lowest loss),
keeping the best. Every term is linear in the logs of its factors, so one objective serves every
law. Fitting in log space weighs every point by its relative error, and the Huber loss keeps one
outlier from steering the fit. Intervals are percentile bootstrap intervals: the points are
resampled with replacement and refitted (the full fit's optimum is one of the starts),
``bootstrap`` times with a fixed seed. With a handful of points they are wide, and they say so; a
law needs at least one point more than it has parameters, so residuals exist. Points held out of
the fit (``holdout``) are predicted by it, and their relative errors reported.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
from pydantic import Field, field_validator, model_validator

from components.registry import MethodParams

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class Factor:
    """``f(x)^-exponent`` in a term: ``f(x)`` is ``x + shift``, or ``log2(x)``; ``exponent=None``
    fixes the power at 1 (the factor enters as ``f(x)`` itself)."""
    variable: str
    exponent: str | None
    shift: float = 0.0
    log2: bool = False

    def base(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return np.log2(x) if self.log2 else x + self.shift


@dataclass(frozen=True)
class Term:
    scale: str
    factors: tuple[Factor, ...]


@dataclass(frozen=True)
class Law:
    name: str
    terms: tuple[Term, ...]
    formula: str
    derived: Callable[[dict[str, float]], dict[str, float]] | None = field(default=None, compare=False)

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.variable for t in self.terms for f in t.factors))

    @property
    def factors(self) -> tuple[Factor, ...]:
        return tuple(f for t in self.terms for f in t.factors)

    @property
    def params(self) -> tuple[str, ...]:
        """E, then each term's scale and its fitted exponents: (E, A, alpha, B, beta) for chinchilla."""
        names = ["E"]
        for term in self.terms:
            names += [term.scale] + [f.exponent for f in term.factors if f.exponent]
        return tuple(names)

    @cached_property  # the objective asks for it at every L-BFGS step
    def layout(self) -> tuple[list[int], list[int | None], list[int]]:
        """Where each term's log-scale and each factor's exponent sit in theta (laid out as
        ``params``), and the term of each factor."""
        scale_index, exponent_index, term_of, i = [], [], [], 1
        for t, term in enumerate(self.terms):
            scale_index.append(i)
            i += 1
            for f in term.factors:
                term_of.append(t)
                exponent_index.append(i if f.exponent else None)
                i += 1 if f.exponent else 0
        return scale_index, exponent_index, term_of

    def predict(self, params: dict[str, float], x: dict[str, np.ndarray]) -> np.ndarray:
        shape = np.shape(x[self.variables[0]]) if self.variables else ()
        out = np.full(shape, params["E"], dtype=float)
        for term in self.terms:
            value = np.full(shape, params[term.scale], dtype=float)
            for f in term.factors:
                value = value * (f.base(x[f.variable]) ** (-params[f.exponent] if f.exponent else 1.0))
            out = out + value
        return out


def _optimal_fp_split(params: dict[str, float]) -> dict[str, float]:
    """Sun et al. eq. 19: the exponent/mantissa split of P bits that minimises the format term."""
    share = params["delta"] / (params["delta"] + params["nu"])
    out = {}
    for bits in (4, 8):
        out[f"exp_bits_opt_p{bits}"] = share * bits - 0.5
        out[f"man_bits_opt_p{bits}"] = (1 - share) * bits - 0.5
    return out


LAWS = {law.name: law for law in (
    Law("constant", (), "L = E"),
    Law("power", (Term("A", (Factor("x", "alpha"),)),), "L = E + A x^-alpha"),
    Law("chinchilla", (Term("A", (Factor("N", "alpha"),)), Term("B", (Factor("D", "beta"),))),
        "L = E + A N^-alpha + B D^-beta"),
    Law("fp_format", (Term("K", (Factor("block", None, log2=True), Factor("exp_bits", "delta", 0.5),
                                 Factor("man_bits", "nu", 0.5))),),
        "L = E + K log2(block) / ((exp_bits + 0.5)^delta (man_bits + 0.5)^nu)", derived=_optimal_fp_split),
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
                "bootstrap": self.bootstrap, "failed_refits": self.failed_refits, **self.extra}


class ScalingFitError(ValueError):
    """Points that cannot determine the law (too few, non-positive, non-finite)."""


def _huber_terms(r: np.ndarray) -> np.ndarray:
    """The Huber loss of each residual (any shape)."""
    return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _huber(r: np.ndarray) -> tuple[float, np.ndarray]:
    grad = np.where(np.abs(r) <= HUBER_DELTA, r, HUBER_DELTA * np.sign(r))
    return float(_huber_terms(r).sum()), grad


def _terms(law: Law, thetas: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """The log of each summand, [starts, 1 + terms, points]: ``e``, then per term
    ``a - sum(exponent * log f)`` (``+ log f`` for a fixed factor); feats: [factors, points] of log f."""
    scale_index, exponent_index, term_of = law.layout
    out = np.empty((thetas.shape[0], 1 + len(law.terms), feats.shape[1]))
    out[:, 0] = thetas[:, :1]
    for t, i in enumerate(scale_index):
        out[:, 1 + t] = thetas[:, i:i + 1]
    for f, (t, j) in enumerate(zip(term_of, exponent_index)):
        out[:, 1 + t] += feats[f] if j is None else -thetas[:, j:j + 1] * feats[f]
    return out


def _objective(law: Law, theta: np.ndarray, feats: np.ndarray, log_y: np.ndarray) -> tuple[float, np.ndarray]:
    terms = _terms(law, theta[None], feats)[0]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    lse = top + np.log(weights.sum(axis=0))
    loss, dr = _huber(lse - log_y)
    soft = weights / weights.sum(axis=0)  # d lse / d term
    scale_index, exponent_index, term_of = law.layout
    grad = np.zeros_like(theta)
    grad[0] = (dr * soft[0]).sum()
    for t, i in enumerate(scale_index):
        grad[i] = (dr * soft[1 + t]).sum()
    for f, (t, j) in enumerate(zip(term_of, exponent_index)):
        if j is not None:
            grad[j] = (dr * soft[1 + t] * -feats[f]).sum()
    return float(loss), grad


def _starts(law: Law) -> np.ndarray:
    """Chinchilla-style grid of starting points [n_starts, len(law.params)]: a few values of e, of
    every log-scale and of every exponent."""
    es, scales, exponents = (-1.0, 0.0, 0.5, 1.0, 1.5), (0.0, 5.0, 10.0, 15.0, 20.0), (0.0, 0.5, 1.0, 2.0)
    axes = [es]
    for term in law.terms:
        axes += [scales] + [exponents for f in term.factors if f.exponent]
    return np.asarray(list(itertools.product(*axes)), dtype=float)


def _grid_losses(law: Law, thetas: np.ndarray, feats: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """The objective at many starting points at once (no gradient)."""
    return _huber_terms(np.logaddexp.reduce(_terms(law, thetas, feats), axis=1) - log_y).sum(axis=1)


def _minimise(law: Law, feats: np.ndarray, log_y: np.ndarray, starts: np.ndarray, keep: int = 8) -> np.ndarray | None:
    """L-BFGS from the ``keep`` starts of lowest loss; the loss is scaled by 1/delta so that
    L-BFGS's tolerances do not stop it on the Huber loss's small values."""
    from scipy.optimize import minimize

    def scaled(theta):
        loss, grad = _objective(law, theta, feats, log_y)
        return loss / HUBER_DELTA, grad / HUBER_DELTA

    best, best_loss = None, math.inf
    for start in starts[np.argsort(_grid_losses(law, starts, feats, log_y))[:keep]]:
        r = minimize(scaled, start, jac=True, method="L-BFGS-B",
                     options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
        if np.all(np.isfinite(r.x)) and r.fun < best_loss:
            best, best_loss = r.x, r.fun
    return best


def _exp(v: float) -> float:
    """exp that saturates to inf: a degenerate refit can drive a log-scale past float range."""
    return math.exp(v) if v < 709.0 else math.inf


def _as_params(law: Law, theta: np.ndarray) -> dict[str, float]:
    scale_index, exponent_index, _ = law.layout
    logged = {0, *scale_index}
    return {name: _exp(v) if i in logged else float(v) for i, (name, v) in enumerate(zip(law.params, theta))}


def _log_prediction(law: Law, theta: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """log L of the law at ``theta``, in log space (finite where the scales themselves overflow)."""
    return np.logaddexp.reduce(_terms(law, theta[None], feats)[0], axis=0)


def _features(law: Law, x: dict[str, list[float]], n: int, where: str) -> np.ndarray:
    """log f(x) of every factor, [factors, n]; refuses values a power law cannot take."""
    values = {}
    for v in law.variables:
        values[v] = np.asarray(x[v], dtype=float)
        if values[v].shape != (n,):
            raise ScalingFitError(f"{where}: every variable needs one value per point ({n} points)")
        if not np.all(np.isfinite(values[v])):
            raise ScalingFitError(f"{where}: the points contain nan or inf")
    bases = [f.base(values[f.variable]) for f in law.factors]
    for f, b in zip(law.factors, bases):
        if np.any(b <= 0):
            what = f"log2({f.variable})" if f.log2 else (f"{f.variable} + {f.shift:g}" if f.shift else f.variable)
            raise ScalingFitError(f"{where}: a power law needs positive variables and losses; {what} is not "
                                  f"positive at {values[f.variable][b <= 0].tolist()}")
    return np.log(np.asarray(bases, dtype=float).reshape(len(bases), n))


def fit_scaling_law(law_name: str, x: dict[str, list[float]], y: list[float], bootstrap: int = 200,
                    seed: int = 0, where: str = "scaling fit", holdout: tuple[dict[str, list[float]], list[float]]
                    | None = None) -> ScalingFitResult:
    """Fit ``law_name`` to points ``(x[var][i], y[i])``; ``where`` names the fit in errors.
    ``holdout`` (x, y) are points kept out of the fit: the law's relative error on each is reported
    (``holdout_rel_errors``, ``holdout_max_rel_error``, ``holdout_mean_rel_error``)."""
    if law_name not in LAWS:
        raise ScalingFitError(f"{where}: unknown law {law_name!r}; known laws: {', '.join(sorted(LAWS))}")
    law = LAWS[law_name]
    for points in (x, *([holdout[0]] if holdout else [])):
        if sorted(points) != sorted(law.variables):
            raise ScalingFitError(f"{where}: the {law.name} law ({law.formula}) needs the variables "
                                  f"{list(law.variables)}, got {sorted(points)}")
    y_values = np.asarray(y, dtype=float)
    n, k = y_values.size, len(law.params)
    if n < k + 1:
        raise ScalingFitError(f"{where}: {n} points cannot fit the {k} parameters of the {law.name} law "
                              f"({law.formula}) with residuals left to judge it; give at least {k + 1}")
    feats = _features(law, x, n, where)
    if not np.all(np.isfinite(y_values)):
        raise ScalingFitError(f"{where}: the points contain nan or inf")
    if np.any(y_values <= 0):
        raise ScalingFitError(f"{where}: a power law needs positive variables and losses")
    log_y = np.log(y_values)
    theta = _minimise(law, feats, log_y, _starts(law))
    params = _as_params(law, theta)
    residuals = log_y - _log_prediction(law, theta, feats)

    rng = np.random.default_rng(seed)
    samples, failed = [], 0
    refit_starts = np.vstack([theta[None], _starts(law)])
    for _ in range(bootstrap):
        pick = rng.integers(0, n, size=n)
        if np.unique(pick).size < k:  # a resample with too few distinct points determines nothing
            failed += 1
            continue
        refit = _minimise(law, feats[:, pick], log_y[pick], refit_starts, keep=3)
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
    extra = dict(law.derived(params)) if law.derived else {}
    if holdout:
        held_y = np.asarray(holdout[1], dtype=float)
        predicted = np.exp(_log_prediction(law, theta, _features(law, holdout[0], held_y.size, f"{where} holdout")))
        errors = np.abs(predicted - held_y) / held_y
        extra.update(holdout_predictions=predicted.tolist(), holdout_rel_errors=errors.tolist(),
                     holdout_max_rel_error=float(errors.max()), holdout_mean_rel_error=float(errors.mean()))
    return ScalingFitResult(law=law.name, params=params, intervals=intervals,
                            log_residuals=[float(r) for r in residuals],
                            rmse_log=float(np.sqrt(np.mean(residuals ** 2))), n_points=n, bootstrap=bootstrap,
                            failed_refits=failed, extra=extra)


# --------------------------------------------------------------------------- in an evaluate stage


class ScalingFitSpec(MethodParams):
    """A law fitted across evaluated models: ``metric`` of each model in ``models`` against the
    law's variables, each given as a per-model metric name (e.g. ``train_tokens``) or as a
    ``{model: value}`` mapping. The fit's parameters become claimable metrics ``<name>.<param>``
    (with ``<param>_low``/``<param>_high``, the 95% interval, and ``rmse_log``), as do a law's
    derived values and, for the ``holdout`` models (predicted, not fitted),
    ``holdout_max_rel_error`` and ``holdout_mean_rel_error``."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="the fit's name in claims and files")
    law: str = Field(description=f"one of {', '.join(sorted(LAWS))}")
    metric: str = Field(min_length=1, description="per-model metric fitted, e.g. loss_all (must be positive)")
    models: list[str] = Field(min_length=2, description="evaluated models that are the fit's points")
    variables: dict[str, str | dict[str, float]] = Field(description="law variable -> per-model metric name "
                                                                     "or {model: value}")
    holdout: list[str] = Field(default_factory=list, description="evaluated models the fitted law predicts "
                               "without being fitted to them")
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
        both = sorted(set(self.models) & set(self.holdout))
        if both:
            raise ValueError(f"holdout models {both} are also fitted (in models); a held-out point must be unseen")
        return self


def fit_points(spec: ScalingFitSpec, per_model: dict[str, dict], models: list[str] | None = None
               ) -> tuple[dict[str, list[float]], list[float]]:
    """The fit's (variables, metric) per model (``spec.models``, or ``models`` such as the holdout);
    a missing model, metric or value names itself."""
    x: dict[str, list[float]] = {v: [] for v in spec.variables}
    y = []
    for model in spec.models if models is None else models:
        if model not in per_model:
            raise ValueError(f"fit {spec.name}: {model!r} was not evaluated by this evaluate stage; "
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
    out.update({k: float(v) for k, v in result.extra.items() if isinstance(v, (int, float))})
    return out


def write_fit_plot(spec: ScalingFitSpec, x: dict[str, list[float]], y: list[float], result: ScalingFitResult,
                   out_dir, title: str, holdout: tuple[dict[str, list[float]], list[float]] | None = None):
    """A one-variable law: measured points and the fitted law on log axes. Any other law: measured
    against fitted (a parity plot). Held-out points are drawn apart."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = LAWS[spec.law]
    label = f"fit: {law.formula}, rmse(log) {result.rmse_log:.3g}"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if len(law.variables) == 1:
        first = law.variables[0]
        fitted = law.predict(result.params, {first: np.asarray(x[first])})
        order = np.argsort(x[first])
        ax.scatter(np.asarray(x[first])[order], np.asarray(y)[order], label="measured", zorder=3)
        ax.plot(np.asarray(x[first])[order], fitted[order], marker="x", linestyle="--", label=label)
        if holdout:
            ax.scatter(holdout[0][first], holdout[1], marker="D", label="held out", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(first if isinstance(spec.variables[first], dict) else f"{first} ({spec.variables[first]})")
        ax.set_ylabel(spec.metric)
    else:
        fitted = np.broadcast_to(law.predict(result.params, {v: np.asarray(x[v]) for v in law.variables}),
                                 np.shape(y))  # a constant law predicts one number
        ax.scatter(fitted, y, label=label, zorder=3)
        seen = [*fitted, *y]
        if holdout:
            predicted = result.extra["holdout_predictions"]
            ax.scatter(predicted, holdout[1], marker="D", zorder=3,
                       label=f"held out: max relative error {result.extra['holdout_max_rel_error']:.3g}")
            seen += [*predicted, *holdout[1]]
        ax.plot([min(seen), max(seen)], [min(seen), max(seen)], color="grey", linewidth=0.8, label="measured = fitted")
        ax.set_xlabel(f"{spec.metric} fitted")
        ax.set_ylabel(f"{spec.metric} measured")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(out_dir) / f"fit_{spec.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
