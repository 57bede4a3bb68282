"""Paper claims as checkable comparisons between metrics of a recipe's stages.

A claim reads ``<metric> <op> factor * <than> + margin``, e.g. "the sparse model's perplexity
is at most 1.1x the dense one's": ``metric="finetune_spdf.ppl_all", op="<=",
than="finetune_dense.ppl_all", factor=1.1``.
"""
from __future__ import annotations

import math
import operator
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class ClaimError(KeyError):
    """A claim refers to a stage or metric that was not produced."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _is_reference(value: str) -> bool:
    stage, _, metric = value.partition(".")
    return bool(stage) and bool(metric)


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="short identifier")
    statement: str = Field(description="the paper's claim in words")
    metric: str = Field(description='left-hand side, a "stage.metric" reference')
    op: Literal["<", "<=", ">", ">="]
    than: str | float = Field(description='right-hand side: a "stage.metric" reference or a number')
    factor: float = Field(1.0, allow_inf_nan=False, description="multiplies the right-hand side")
    margin: float = Field(0.0, allow_inf_nan=False, description="added to the right-hand side after the factor")
    plus: dict[str, float] = Field(default_factory=dict, description=(
        'more right-hand-side terms, {"stage.metric": weight}: e.g. "keeps 90% of the gain" is '
        "ft_c <= 0.9 * ft + 0.1 * base"))

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


def check_claims(claims: Sequence[Claim], metrics: dict[str, dict[str, float]]) -> list[dict]:
    """Evaluate each claim; missing references raise ``ClaimError``, non-finite values FAIL."""
    results = []
    for claim in claims:
        lhs_raw = _lookup(claim, claim.metric, metrics)
        if isinstance(claim.than, str):
            ref_raw = _lookup(claim, claim.than, metrics)
        else:
            ref_raw = claim.than
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
        detail = f"{claim.metric} = {lhs_text} {claim.op} {rhs_text}"

        problems = []
        if lhs is None or not math.isfinite(lhs):
            problems.append(f"{claim.metric} is not a finite number ({lhs_raw!r})")
        if rhs is None or not math.isfinite(rhs):
            problems.append(f"right-hand side is not a finite number ({ref_raw!r})")
        if problems:
            passed = False
            detail += ": FAIL, " + "; ".join(problems)
        else:
            passed = bool(OPS[claim.op](lhs, rhs))
            detail += ": PASS" if passed else ": FAIL"
        results.append({
            "name": claim.name, "statement": claim.statement, "lhs": lhs, "rhs": rhs,
            "op": claim.op, "passed": passed, "detail": detail,
        })
    return results
