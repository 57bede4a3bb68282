"""Base classes of the select stage's methods.

Three shapes of method, all registered in ``SELECTORS``:

- ``Selector``: a keep mask over the whole training table (rule filters, dedup).
- ``ScoringSelector``: ranks documents; the stage keeps the best-scoring ones up to a budget
  (tokens or a document fraction). ``fit`` sees the target set, reference models and a seeded
  sample of the pool once; ``score`` then runs shard by shard, so memory stays bounded by one
  shard plus one float per document.
- ``DocumentTransform``: rewrites the training table (drop, edit, repeat or add documents).

Every method sees the training documents without ``noise_label`` (the injected-noise ground
truth): that column exists only to score the selection afterwards.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components.registry import Method, MethodParams

HIDDEN_COLUMNS = ("noise_label",)


def document_uniforms(keys, seed: int) -> np.ndarray:
    """One uniform draw in the open interval (0, 1) per key (e.g. a document id), a pure function
    of ``(seed, key)``: a document's draw does not depend on its shard or its position."""
    prefix = f"{seed}\x00".encode()
    words = np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(k).encode(), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64, count=len(keys))
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # top 53 bits; +0.5 avoids 0 and 1


def blind(docs: pd.DataFrame) -> pd.DataFrame:
    """``docs`` without the ground-truth columns selectors must not see."""
    return docs.drop(columns=list(HIDDEN_COLUMNS), errors="ignore")


class SelectionError(ValueError):
    """A selection cannot be made as asked (empty target, budget larger than the pool, ...)."""


def apply_domains(docs: pd.DataFrame, domains: list[str] | None, where: str) -> np.ndarray:
    """Rows the transform rewrites: all, or those whose domain is listed (checked to exist)."""
    if domains is None:
        return np.ones(len(docs), dtype=bool)
    present = set(docs["domain"])
    missing = [d for d in domains if d not in present]
    if missing:
        raise SelectionError(f"{where}: domains={missing} not among the training documents' domains "
                             f"(present: {', '.join(sorted(present)) or 'none'})")
    return docs["domain"].isin(domains).to_numpy()


@dataclass
class ReferenceModel:
    """A model produced by an earlier stage, handed to a selector (e.g. to score perplexity)."""

    name: str  # the upstream stage name
    model: Any  # a transformers PreTrainedModel in eval mode
    facts: dict = field(default_factory=dict)


@dataclass
class SelectionContext:
    """What a selector may use besides the documents it scores."""

    stage: str  # for error messages
    seed: int
    target: pd.DataFrame | None = None  # target-set documents (blind), when the method needs them
    tokenizer: Any = None  # the `tokenizer` input's tokenizer (budget counting, model scoring)
    references: list[ReferenceModel] = field(default_factory=list)
    pool_sample: pd.DataFrame | None = None  # a seeded sample of the training pool (blind)
    work_dir: Path | None = None  # scratch space inside the stage's temporary artifact dir
    progress: bool = False


def pick_reference(context: SelectionContext, name: str | None, who: str) -> ReferenceModel:
    """The `reference` input named ``name`` (default: the first one), with a clear error."""
    refs = context.references
    if not refs:
        raise SelectionError(f"{context.stage}: {who} needs a model: give the stage a `reference` input "
                             f"(a pretrain/finetune stage)")
    if name is None:
        return refs[0]
    for ref in refs:
        if ref.name == name:
            return ref
    raise SelectionError(f"{context.stage}: {who}: reference={name!r} is not among the `reference` inputs "
                         f"({', '.join(r.name for r in refs)})")


class Selector(Method):
    """Decides per document whether to keep it. Selectors never see ``noise_label``.

    ``stats`` holds counts by removal reason from the last call, for logging.
    """

    #: the method needs a target set (``target_domain`` or a `target` input)
    needs_target: bool = False
    #: the method needs at least this many reference models (the `reference` input)
    min_references: int = 0
    #: the method needs the `tokenizer` input
    needs_tokenizer: bool = False

    def __init__(self, params=None):
        super().__init__(params)
        self.stats: dict = {}

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement keep_mask()")

    def select(self, docs: pd.DataFrame) -> np.ndarray:
        """Keep mask for ``docs`` computed without the ground-truth ``noise_label`` column."""
        hidden = blind(docs)
        mask = np.asarray(self.keep_mask(hidden))
        if mask.dtype != bool or mask.shape != (len(docs),):
            raise ValueError(
                f"{type(self).__name__}.keep_mask returned {mask.dtype} array of shape {mask.shape}; "
                f"expected bool of shape ({len(docs)},)"
            )
        return mask


class TargetParams(MethodParams):
    """Where the target set comes from: a `target` input (all its documents, optionally one
    domain), else the held-out ``target_split`` of the input documents in ``target_domain``."""

    target_domain: str | None = Field(None, min_length=1, description="domain of the target set")
    # never "test": the evaluate stage measures on the test split, so targeting it would leak
    target_split: Literal["validation", "train"] = Field(
        "validation", description="split the target documents are taken from (held-out by default)")
    target_max_docs: int | None = Field(None, ge=1, description="cap on target documents (seeded sample)")


class BudgetParams(TargetParams):
    """How much a scoring selector keeps: ``budget_tokens`` (counted with the `tokenizer`
    input's tokenizer, so every method and the random baseline select equal tokens) or
    ``keep_fraction`` of the training documents."""

    budget_tokens: int | None = Field(None, ge=1, description="keep top documents until this many tokens")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of documents")
    seed: int = Field(0, ge=0, description="seeds every random choice of the method")
    fit_sample_docs: int = Field(4000, ge=1, description="pool documents sampled for `fit`")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.budget_tokens is None) == (self.keep_fraction is None):
            raise ValueError("give exactly one of budget_tokens and keep_fraction")
        return self


class ScoringSelector(Selector):
    """Scores documents (higher = keep first); the select stage fills the budget in score order."""

    Params = BudgetParams

    def fit(self, context: SelectionContext) -> None:
        """Called once before any ``score`` call."""

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def scores(self, docs: pd.DataFrame) -> np.ndarray:
        """``score`` on blind documents, checked: one finite float per document."""
        values = np.asarray(self.score(blind(docs)), dtype=np.float64)
        if values.shape != (len(docs),):
            raise ValueError(f"{type(self).__name__}.score returned shape {values.shape}; expected ({len(docs)},)")
        if not np.isfinite(values).all():
            raise ValueError(f"{type(self).__name__}.score returned {int((~np.isfinite(values)).sum())} non-finite scores")
        return values

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        """Without a token budget (``keep_fraction``): the top fraction by score."""
        if self.params.keep_fraction is None:
            raise SelectionError(f"{self.key}: budget_tokens needs the select stage (token counts); use keep_fraction")
        return budget_mask(self.scores(docs), np.ones(len(docs)), None, self.params.keep_fraction, self.key)


def budget_mask(scores: np.ndarray, n_tokens: np.ndarray, budget_tokens: int | None,
                keep_fraction: float | None, where: str) -> np.ndarray:
    """Keep documents in descending score order until the budget is met.

    Ties break by position (stable sort), so the mask is a pure function of its inputs. With a
    token budget the last document kept may overshoot by less than one document.
    """
    n = len(scores)
    if n == 0:
        raise SelectionError(f"{where}: the pool is empty")
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = np.zeros(n, dtype=bool)
    if keep_fraction is not None:
        keep[order[: max(1, int(round(keep_fraction * n)))]] = True
        return keep
    total = int(np.sum(n_tokens))
    if budget_tokens > total:
        raise SelectionError(
            f"{where}: budget_tokens={budget_tokens} is larger than the pool ({total} tokens in {n} documents); "
            f"lower budget_tokens or select from a larger pool")
    cumulative = np.cumsum(np.asarray(n_tokens)[order])
    n_keep = int(np.searchsorted(cumulative, budget_tokens, side="left")) + 1
    keep[order[:n_keep]] = True
    return keep


class DocumentTransform(Selector):
    """Rewrites the training table: may drop, edit, repeat or add documents.

    The result must satisfy the document schema with unique ids; added rows must say where they
    came from in ``source``.
    """

    def transform(self, docs: pd.DataFrame, context: SelectionContext) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} must implement transform()")

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        raise TypeError(f"{self.key} rewrites documents; the select stage calls transform(), not keep_mask()")
