"""Threshold or percentile filter over any numeric score column, for filter sweeps.

Longpre et al. 2023 ("A Pretrainer's Guide to Training Data", arXiv 2305.13169; no code) sweep
quality filters by classifier percentile and toxicity filters by score threshold, plus inverse
filters that keep the other end; 1.5-Pints (arXiv 2408.03506) keeps a curated top share. How
their percentiles were computed is not public: here a percentile is a share of the scored
documents (optionally per group, e.g. per domain), ranked by the column; ties break by position.

The column is any numeric column of the document table: the ``<method>_score`` column a scoring
stage writes (``tasks/select.py``) or a metadata column the corpus carries.

NaN scores (a document an earlier stage did not score): ``nan: drop`` (default) removes them, as
a document without a score cannot pass a filter; ``nan: keep`` keeps them. Either way they are
not ranked, so ``keep_fraction`` is a share of the scored documents.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components.data.selector import Selector, SelectionError
from components.registry import MethodParams, Paper


def numeric_column(docs: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """``docs[column]`` as float64, or an error naming the column and listing the numeric ones."""
    numeric = [c for c in docs.columns if pd.api.types.is_numeric_dtype(docs[c])]
    listing = ", ".join(map(str, numeric)) or "none"
    if column not in docs.columns:
        raise SelectionError(f"{where}: no column {column!r} in the documents; numeric columns: {listing}")
    if not pd.api.types.is_numeric_dtype(docs[column]):
        raise SelectionError(f"{where}: column {column!r} is {docs[column].dtype}, not numeric; "
                             f"numeric columns: {listing}")
    return docs[column].to_numpy(dtype=np.float64, na_value=np.nan)


def top_fraction_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """The top ``round(fraction * n)`` values (at least one), ties by position."""
    keep = np.zeros(len(values), dtype=bool)
    if len(values):
        order = np.argsort(-values, kind="stable")
        keep[order[: max(1, int(round(fraction * len(values))))]] = True
    return keep


class ScoreFilter(Selector):
    """Keeps documents whose score passes a threshold, or the top (or bottom) share by score."""

    key = "score_filter"
    paper = Paper("A Pretrainer's Guide to Training Data: Measuring the Effects of Data Age, Domain "
                  "Coverage, Quality, & Toxicity", url="https://arxiv.org/abs/2305.13169", arxiv="2305.13169")

    class Params(MethodParams):
        column: str = Field(min_length=1, description="numeric column, e.g. perplexity_score")
        threshold: float | None = Field(None, description="keep documents on the `keep` side (inclusive)")
        keep: Literal["above", "below"] = Field("above", description="with threshold: which side is kept")
        keep_fraction: float | None = Field(None, gt=0, le=1, description="keep the top fraction of documents")
        keep_percentile: float | None = Field(None, gt=0, le=100,
                                              description="keep the top percent of documents (= keep_fraction*100)")
        invert: bool = Field(False, description="with keep_fraction/percentile: keep the lowest scores instead")
        by: str | None = Field(None, min_length=1, description="rank within each value of this column "
                                                               "(e.g. domain); None = over all documents")
        nan: Literal["drop", "keep"] = Field("drop", description="what happens to documents with a NaN score")

        @model_validator(mode="after")
        def _one_rule(self):
            given = [n for n in ("threshold", "keep_fraction", "keep_percentile") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of threshold, keep_fraction and keep_percentile (got "
                                 f"{', '.join(given) or 'none'})")
            if self.threshold is not None and self.invert:
                raise ValueError("invert applies to keep_fraction/keep_percentile; with a threshold use keep: below")
            if self.threshold is not None and self.by is not None:
                raise ValueError("by applies to keep_fraction/keep_percentile, not to a threshold")
            return self

        @property
        def fraction(self) -> float | None:
            return self.keep_percentile / 100 if self.keep_percentile is not None else self.keep_fraction

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        p = self.params
        where = f"{self.key}(column={p.column!r})"
        values = numeric_column(docs, p.column, where)
        scored = ~np.isnan(values)
        keep = np.zeros(len(docs), dtype=bool)
        if p.threshold is not None:
            keep[scored] = values[scored] >= p.threshold if p.keep == "above" else values[scored] <= p.threshold
            cutoff = p.threshold
        else:
            if p.by is not None and p.by not in docs.columns:
                raise SelectionError(f"{where}: by={p.by!r} is not a column; columns: "
                                     f"{', '.join(map(str, docs.columns))}")
            groups = docs[p.by].to_numpy() if p.by is not None else np.zeros(len(docs))
            signed = -values if p.invert else values
            for group in pd.unique(groups[scored]):
                rows = np.flatnonzero(scored & (groups == group))
                keep[rows[top_fraction_mask(signed[rows], p.fraction)]] = True
            kept = values[keep]
            cutoff = (kept.max() if p.invert else kept.min()) if kept.size else np.nan
        if p.nan == "keep":
            keep |= ~scored
        self.stats = {"n_docs": len(docs), "n_removed": int((~keep).sum()), "n_nan": int((~scored).sum())}
        kept_scored = values[keep & scored]
        self.facts = {
            "score_filter_cutoff": float(cutoff),
            "score_filter_kept_mean": float(kept_scored.mean()) if kept_scored.size else float("nan"),
            "score_filter_pool_mean": float(values[scored].mean()) if scored.any() else float("nan"),
        }
        return keep
