"""Paper claims as checkable comparisons between metrics of a recipe's stages.

A claim reads ``<metric> <op> factor * <than> + margin (+ plus terms)``, e.g. "the sparse
model's perplexity is at most 1.1x the dense one's": ``metric="finetune_spdf.ppl_all",
op="<=", than="finetune_dense.ppl_all", factor=1.1``. ``op: within`` is a two-sided claim,
``|metric - rhs| <= tolerance * |rhs|``, one claim that fails if either side fails.

What a PASS means is what makes a claim evidence rather than decoration:
- ``kind: accounting`` marks a claim true by construction (FLOPs from a mask density, bytes,
  a budget the solver enforces). It is checked and reported, never counted as reproduced.
- an ``experiment`` claim (the default) has a **control**: the same comparison with the
  method's stage replaced by the trivial baseline's (``control: {replace: {gptq: rtn}}``). If
  the control also clears the bar, the verdict is ``NOT DISCRIMINATING``, not PASS. A claim
  that already compares the method against the baseline with a strict ``<``/``>`` (factor 1,
  no margin) needs no explicit control: replacing the method by the baseline compares the
  baseline with itself, which a strict comparison fails.
- with **seeds**, a claim is judged on the paired per-seed slack (how far each seed clears
  the bar: ``rhs - lhs`` for ``<``) and its 95% t-interval; PASS needs the whole interval on
  the passing side. The control counts as clearing the bar when its mean slack does. An
  accounting claim is a bound each seed's stage must keep (a bit budget), so under seeds it
  passes when every seed clears the bar, not when an interval of the mean does.
- a **perplexity** claim (its metric is a ``ppl`` one) measures slack on the log scale:
  ``ln(bar) - ln(ppl)``, the cross-entropy difference in nats. Each seed clears the bar exactly
  when it does on the raw scale; what changes is the interval over seeds. Perplexity is
  ``exp(loss)``, so its spread grows with its level: one seed that diverges to 4,000 against a bar
  of 40 swamps a raw paired interval even when every seed clears the bar 30x over, and a method
  that wins on every seed FAILs. Differences of log perplexity are what the models were trained
  to lower and do not scale with the level.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
STRICT_OPS = ("<", ">")
VERDICTS = ("PASS", "FAIL", "NOT DISCRIMINATING")
PERPLEXITY_METRIC = re.compile(r"(^|[._])ppl([._]|$)")  # ppl_all, retrieval_ppl_retrieved, ...


class ClaimError(KeyError):
    """A claim refers to a stage or metric that was not produced."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _is_reference(value: str) -> bool:
    stage, _, metric = value.partition(".")
    return bool(stage) and bool(metric)


class Control(BaseModel):
    """The trivial baseline in the method's place: the same comparison must fail with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replace: dict[str, str] = Field(min_length=1, description=(
        "stage in the claim -> the baseline stage that replaces it (RTN for a PTQ method, the plain "
        "average for a merge, random for a selector, the model before the method...); or a whole "
        '"stage.metric" reference -> the baseline\'s reference (a shuffled-label refit in the same stage)'))
    why: str = Field("", description="what the control stands for, in words")

    @model_validator(mode="after")
    def _same_shape(self):
        for key, value in self.replace.items():
            if _is_reference(key) and not _is_reference(value):
                raise ValueError(f"control replaces the reference {key!r} with {value!r}: a whole reference must be "
                                 'replaced by a "stage.metric" reference')
            if not _is_reference(key) and (not value.isidentifier() or "." in value):
                raise ValueError(f"control replaces stage {key!r} with {value!r}: a stage must be replaced by a stage name")
        return self


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="short identifier")
    statement: str = Field(description="the paper's claim in words")
    kind: Literal["experiment", "accounting"] = Field(
        "experiment", description="accounting: true by construction (FLOPs, bytes, budgets); never counted as reproduced")
    metric: str = Field(description='left-hand side, a "stage.metric" reference')
    op: Literal["<", "<=", ">", ">=", "within"]
    than: str | float = Field(description='right-hand side: a "stage.metric" reference or a number')
    factor: float = Field(1.0, allow_inf_nan=False, description="multiplies the right-hand side")
    margin: float = Field(0.0, allow_inf_nan=False, description="added to the right-hand side after the factor")
    plus: dict[str, float] = Field(default_factory=dict, description=(
        'more right-hand-side terms, {"stage.metric": weight}: e.g. "keeps 90% of the gain" is '
        "ft_c <= 0.9 * ft + 0.1 * base"))
    tolerance: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="op within: the allowed relative distance |lhs - rhs| / |rhs|")
    control: Control | None = Field(None, description="the trivial baseline in the method's place (experiment claims)")

    @field_validator("plus")
    @classmethod
    def _plus_are_references(cls, value: dict[str, float]) -> dict[str, float]:
        for ref in value:
            if not _is_reference(ref):
                raise ValueError(f'plus keys must look like "stage.metric", got {ref!r}')
        return value

    @field_validator("metric")
    @classmethod
    def _metric_is_reference(cls, value: str) -> str:
        if not _is_reference(value):
            raise ValueError(f'metric must look like "stage.metric", got {value!r}')
        return value

    @field_validator("than")
    @classmethod
    def _than_is_reference_or_number(cls, value: str | float) -> str | float:
        if isinstance(value, str):
            try:
                return float(value)  # a quoted number such as "45.3" is a number, not stage "45"
            except ValueError:
                pass
            if not _is_reference(value):
                raise ValueError(f'than must be a number or look like "stage.metric", got {value!r}')
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if (self.op == "within") != (self.tolerance is not None):
            raise ValueError(f"claim {self.name!r}: op 'within' needs a tolerance, and only it takes one")
        if self.kind == "accounting" and self.control is not None:
            raise ValueError(f"claim {self.name!r}: an accounting claim is true by construction; it takes no control")
        if self.kind == "experiment":
            if self.control is None and self.implicit_control() is None:
                raise ValueError(
                    f"claim {self.name!r}: an experiment claim needs a control (control: {{replace: {{<method stage>: "
                    "<baseline stage>}}}) unless it compares the method strictly (< or >, factor 1, no margin) "
                    "against the baseline itself; mark claims true by construction kind: accounting")
            if self.control is not None:
                refs = set(self.references())
                stages = {ref.split(".", 1)[0] for ref in refs}
                unused = set(self.control.replace) - stages - refs
                if unused:
                    raise ValueError(f"claim {self.name!r}: control replaces {sorted(unused)}, which the claim does "
                                     f"not refer to (it refers to {sorted(stages)})")
        return self

    def references(self) -> list[str]:
        return [self.metric, *([self.than] if isinstance(self.than, str) else []), *self.plus]

    def implicit_control(self) -> Control | None:
        """``method < baseline`` strictly, with nothing added: the control is the baseline in the
        method's place, which cannot strictly beat itself."""
        if (self.op in STRICT_OPS and isinstance(self.than, str) and self.factor == 1.0 and self.margin == 0.0
                and not self.plus):
            method, baseline = self.metric.split(".", 1)[0], self.than.split(".", 1)[0]
            if method != baseline:
                return Control(replace={method: baseline}, why=f"{baseline} in place of {method}")
        return None

    def effective_control(self) -> Control | None:
        return self.control or (self.implicit_control() if self.kind == "experiment" else None)

    def with_stages_replaced(self, replace: dict[str, str]) -> "Claim":
        def swap(ref: str) -> str:
            if ref in replace:  # a whole reference
                return replace[ref]
            stage, _, metric = ref.partition(".")
            return f"{replace.get(stage, stage)}.{metric}"

        return self.model_copy(update={
            "metric": swap(self.metric), "than": swap(self.than) if isinstance(self.than, str) else self.than,
            "plus": {swap(r): w for r, w in self.plus.items()}})


def _lookup(claim: Claim, ref: str, metrics: dict[str, dict[str, float]]):
    # Stage or metric names may contain dots, so try every split point.
    parts = ref.split(".")
    for i in range(1, len(parts)):
        stage, metric = ".".join(parts[:i]), ".".join(parts[i:])
        if stage in metrics and metric in metrics[stage]:
            return metrics[stage][metric]
    stage = parts[0]
    if stage in metrics:
        raise ClaimError(f"claim {claim.name!r}: stage {stage!r} has no metric {'.'.join(parts[1:])!r}; "
                         f"its metrics: {', '.join(sorted(metrics[stage]))}")
    raise ClaimError(f"claim {claim.name!r}: reference {ref!r} names no evaluated stage; evaluated stages: "
                     f"{', '.join(sorted(metrics)) or '(none)'}")


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(x: float) -> str:
    return f"{x:.6g}"


@dataclass
class Comparison:
    """One claim evaluated on one set of metrics (one seed)."""

    lhs: float | None
    rhs: float | None
    slack: float | None  # how far the bar is cleared (> 0 clears a strict bar); None if not finite
    text: str
    problem: str = ""


def _compare(claim: Claim, metrics: dict[str, dict[str, float]]) -> Comparison:
    lhs_raw = _lookup(claim, claim.metric, metrics)
    ref_raw = _lookup(claim, claim.than, metrics) if isinstance(claim.than, str) else claim.than
    lhs, ref = _as_float(lhs_raw), _as_float(ref_raw)
    extra = {r: _as_float(_lookup(claim, r, metrics)) for r in claim.plus}
    rhs = None if ref is None or None in extra.values() else (
        claim.factor * ref + claim.margin + sum(w * extra[r] for r, w in claim.plus.items()))

    ref_text = _fmt(ref) if ref is not None else repr(ref_raw)
    rhs_text = f"{claim.than} (= {ref_text})" if isinstance(claim.than, str) else ref_text
    if claim.factor != 1.0:
        rhs_text = f"{claim.factor:.2f} × {rhs_text}"
    if claim.margin != 0.0:
        rhs_text += f" {'+' if claim.margin > 0 else '-'} {_fmt(abs(claim.margin))}"
    for r, w in claim.plus.items():
        rhs_text += f" + {w:.2f} × {r} (= {_fmt(extra[r]) if extra[r] is not None else '?'})"
    if (claim.factor != 1.0 or claim.margin != 0.0 or claim.plus) and rhs is not None:
        rhs_text += f" = {_fmt(rhs)}"
    lhs_text = _fmt(lhs) if lhs is not None else repr(lhs_raw)
    op_text = f"within ±{claim.tolerance:.3g}× of" if claim.op == "within" else claim.op
    text = f"{claim.metric} = {lhs_text} {op_text} {rhs_text}"

    problems = []
    if lhs is None or not math.isfinite(lhs):
        problems.append(f"{claim.metric} is not a finite number ({lhs_raw!r})")
    if rhs is None or not math.isfinite(rhs):
        problems.append(f"right-hand side is not a finite number ({ref_raw!r})")
    if problems:
        return Comparison(lhs, rhs, None, text, "; ".join(problems))
    if log_scale(claim):
        if lhs <= 0 or rhs <= 0:
            return Comparison(lhs, rhs, None, text, f"a perplexity claim needs positive values on both sides "
                                                    f"(log scale): {_fmt(lhs)} vs {_fmt(rhs)}")
        if claim.op == "within":  # the same band [(1 - t) rhs, (1 + t) rhs], measured in log units
            if claim.tolerance >= 1:
                return Comparison(lhs, rhs, None, text, "a perplexity claim's within tolerance must be < 1")
            slack = min(math.log((1 + claim.tolerance) * rhs / lhs), math.log(lhs / ((1 - claim.tolerance) * rhs)))
        else:
            slack = math.log(rhs / lhs) if claim.op in ("<", "<=") else math.log(lhs / rhs)
        return Comparison(lhs, rhs, slack, text)
    if claim.op == "within":
        slack = claim.tolerance * abs(rhs) - abs(lhs - rhs)
    else:
        slack = rhs - lhs if claim.op in ("<", "<=") else lhs - rhs
    return Comparison(lhs, rhs, slack, text)


def log_scale(claim: Claim) -> bool:
    """Whether the claim's slack is measured on the log scale: its metric is a perplexity."""
    return bool(PERPLEXITY_METRIC.search(claim.metric.split(".", 1)[-1]))


def _clears(slack: float, op: str) -> bool:
    return slack > 0 if op in STRICT_OPS else slack >= 0


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student-t interval of the mean of ``values``."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _judge(claim: Claim, per_seed: list[dict[str, dict[str, float]]], seeds: list[int] | None) -> dict:
    """Evaluate ``claim`` on each seed's metrics; returns passed, slack stats and a detail line."""
    comparisons = [_compare(claim, m) for m in per_seed]
    bad = [c for c in comparisons if c.slack is None]
    if len(comparisons) == 1:
        c = comparisons[0]
        if bad:
            return {"passed": False, "lhs": c.lhs, "rhs": c.rhs, "slack": None, "detail": f"{c.text}: {c.problem}"}
        return {"passed": _clears(c.slack, claim.op), "lhs": c.lhs, "rhs": c.rhs, "slack": c.slack, "detail": c.text}
    if bad:
        which = [s for s, c in zip(seeds, comparisons) if c.slack is None]
        return {"passed": False, "lhs": None, "rhs": None, "slack": None,
                "detail": f"seed(s) {which}: {bad[0].problem}", "per_seed": [c.text for c in comparisons]}
    slacks = [c.slack for c in comparisons]
    mean, low, high = t_interval(slacks)
    log = log_scale(claim)
    if log:  # the means that match a log-scale slack: geometric
        lhs_mean = math.exp(sum(math.log(c.lhs) for c in comparisons) / len(comparisons))
        rhs_mean = math.exp(sum(math.log(c.rhs) for c in comparisons) / len(comparisons))
    else:
        lhs_mean = sum(c.lhs for c in comparisons) / len(comparisons)
        rhs_mean = sum(c.rhs for c in comparisons) / len(comparisons)
    if claim.kind == "accounting":  # a bound each seed must keep; an interval of the mean would demand more
        passed = all(_clears(s, claim.op) for s in slacks)
        rule = f"every seed must clear it; worst seed's slack {_fmt(min(slacks))}"
    else:
        passed = _clears(low, claim.op)
        rule = "the interval must clear 0"
    means = "geometric mean" if log else "mean"
    slack_text = "paired log slack (ln bar - ln ppl)" if log else "paired slack"
    detail = (f"{claim.metric} {means} {_fmt(lhs_mean)} vs bar {means} {_fmt(rhs_mean)} over seeds {seeds}; "
              f"{slack_text} {_fmt(mean)}, 95% interval [{_fmt(low)}, {_fmt(high)}] (> 0 clears the bar; {rule})")
    return {"passed": passed, "lhs": lhs_mean, "rhs": rhs_mean, "slack": mean, "slack_interval": [low, high],
            "slack_per_seed": slacks, "detail": detail, "per_seed": [c.text for c in comparisons]}


@dataclass(frozen=True)
class SeedPlan:
    """How a seeded recipe's stages were expanded: ``expanded[stage][i]`` is its copy for ``seeds[i]``."""

    seeds: list[int]
    expanded: dict[str, list[str]]

    def metrics_per_seed(self, metrics: dict[str, dict[str, float]],
                         stages: set[str]) -> list[dict[str, dict[str, float]]]:
        """One metrics dict per seed in which each expanded stage among ``stages`` (those a claim
        reads) maps to that seed's copy; a copy without metrics is an error naming it."""
        out = []
        for i, seed in enumerate(self.seeds):
            view = dict(metrics)
            for stage in stages & set(self.expanded):
                copy = self.expanded[stage][i]
                if copy not in metrics:
                    raise ClaimError(f"stage {stage!r} has no metrics for seed {seed} (its copy {copy!r} was not "
                                     f"evaluated or logged nothing)")
                view[stage] = metrics[copy]
            out.append(view)
        return out


def check_claims(claims: Sequence[Claim], metrics: dict[str, dict[str, float]],
                 seeds: SeedPlan | None = None) -> list[dict]:
    """Evaluate each claim and its control; missing references raise ``ClaimError``, non-finite
    values FAIL. Each result has ``verdict`` (PASS, FAIL or NOT DISCRIMINATING), ``passed``
    (verdict == PASS), ``kind`` and ``reproduced`` (a PASS of an experiment claim)."""
    results = []
    for claim in claims:
        stages = claim_stages(claim)
        seeded = seeds is not None and bool(stages & set(seeds.expanded))  # else one value, no interval
        per_seed = seeds.metrics_per_seed(metrics, stages) if seeded else [metrics]
        seed_list = seeds.seeds if seeded else None
        main = _judge(claim, per_seed, seed_list)
        control = claim.effective_control()
        control_result = _judge(claim.with_stages_replaced(control.replace), per_seed, seed_list) if control else None
        control_clears = control_result is not None and control_result["slack"] is not None and \
            _clears(control_result["slack"], claim.op)
        control_unknown = control_result is not None and control_result["slack"] is None
        if not main["passed"] or control_unknown:  # a control that could not be measured proves nothing
            verdict = "FAIL"
        else:
            verdict = "NOT DISCRIMINATING" if control_clears else "PASS"
        detail = f"{main['detail']}: {verdict}"
        if control_result is not None:
            outcome = ("could not be measured" if control_unknown else
                       "clears the bar too" if control_clears else "does not clear it")
            detail += (f"; control ({control.why or ', '.join(f'{b} for {m}' for m, b in control.replace.items())}): "
                       f"{control_result['detail']}: {outcome}")
        result = {"name": claim.name, "statement": claim.statement, "kind": claim.kind, "op": claim.op,
                  "slack_scale": "log" if log_scale(claim) else "linear",
                  "lhs": main["lhs"], "rhs": main["rhs"], "slack": main["slack"], "verdict": verdict,
                  "passed": verdict == "PASS", "reproduced": verdict == "PASS" and claim.kind == "experiment",
                  "detail": detail}
        for key in ("slack_interval", "slack_per_seed", "per_seed"):
            if key in main:
                result[key] = main[key]
        if control_result is not None:
            result["control"] = {"replace": control.replace, "slack": control_result["slack"],
                                 "clears_bar": control_clears, "detail": control_result["detail"]}
        results.append(result)
    return results


def verdict_label(result: dict) -> str:
    """PASS, FAIL or NOT DISCRIMINATING; accounting claims say so, since they prove nothing."""
    return f"{result['verdict']} (accounting)" if result.get("kind") == "accounting" else result["verdict"]


def claim_stages(claim: Claim) -> set[str]:
    """Every stage a claim or its control reads."""
    refs = claim.references()
    control = claim.effective_control()
    if control is not None:
        refs += claim.with_stages_replaced(control.replace).references()
    return {ref.split(".", 1)[0] for ref in refs}
