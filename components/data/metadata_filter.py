"""Metadata splits: keep documents whose metadata column matches values or lies in a range.

Longpre et al. 2023 ("A Pretrainer's Guide to Training Data", arXiv 2305.13169) train on
slices of a corpus by collection year (data age) and by source domain; this filter cuts such
slices from any column of the document table (``source``, ``domain``, or a year/date column a
corpus carries). ``values`` keeps exact matches; ``min``/``max`` keep an inclusive range, compared
as numbers for a numeric column and as timestamps for a date column or a column of date strings.
``exclude`` keeps the complement. Missing values (NaN/None) never match.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components.data.selector import Selector, SelectionError
from components.registry import MethodParams, Paper

_SHOWN = 20


class MetadataFilter(Selector):
    """Keeps documents by a metadata column: listed values or an inclusive range."""

    key = "metadata_filter"
    paper = Paper("A Pretrainer's Guide to Training Data: Measuring the Effects of Data Age, Domain "
                  "Coverage, Quality, & Toxicity (data-age and domain slices)",
                  url="https://arxiv.org/abs/2305.13169", arxiv="2305.13169")

    class Params(MethodParams):
        column: str = Field(min_length=1, description="e.g. source, domain, year")
        values: list[str | int | float | bool] | None = Field(
            None, min_length=1, description="keep documents whose column equals one of these")
        min: float | int | str | None = Field(None, description="inclusive lower bound (number or date)")
        max: float | int | str | None = Field(None, description="inclusive upper bound (number or date)")
        exclude: bool = Field(False, description="keep the documents that do not match instead")

        @model_validator(mode="after")
        def _one_mode(self):
            ranged = self.min is not None or self.max is not None
            if (self.values is not None) == ranged:
                raise ValueError("give either values or a range (min and/or max), not both or neither")
            return self

    def _range_mask(self, column: pd.Series, where: str) -> np.ndarray:
        p = self.params
        bounds = [b for b in (p.min, p.max) if b is not None]
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            if any(isinstance(b, str) for b in bounds):
                raise SelectionError(f"{where}: column {p.column!r} is numeric; min/max must be numbers, "
                                     f"got min={p.min!r}, max={p.max!r}")
            values = column.to_numpy(dtype=np.float64, na_value=np.nan)
            low, high = (-np.inf if p.min is None else p.min), (np.inf if p.max is None else p.max)
        else:
            try:  # a date column, or strings that parse as dates
                values = pd.to_datetime(column, format="mixed").to_numpy()
                low = pd.Timestamp.min if p.min is None else pd.Timestamp(str(p.min))
                high = pd.Timestamp.max if p.max is None else pd.Timestamp(str(p.max))
                low, high = np.datetime64(low), np.datetime64(high)
            except (ValueError, TypeError) as err:
                examples = ", ".join(repr(v) for v in column.dropna().unique()[:5])
                raise SelectionError(f"{where}: a min/max range needs a numeric or date column; column "
                                     f"{p.column!r} ({column.dtype}, e.g. {examples}) does not parse as dates "
                                     f"({err}); use values: [...] instead") from None
        with np.errstate(invalid="ignore"):
            mask = (values >= low) & (values <= high)
        return np.asarray(mask, dtype=bool)  # NaN / NaT compare False

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        p = self.params
        where = f"{self.key}(column={p.column!r})"
        if p.column not in docs.columns:
            raise SelectionError(f"{where}: no column {p.column!r} in the documents; columns: "
                                 f"{', '.join(map(str, docs.columns))}")
        column = docs[p.column]
        if p.values is not None:
            present = set(column.dropna().unique().tolist())
            absent = [v for v in p.values if v not in present]
            if absent:
                shown = sorted(present, key=str)[:_SHOWN]
                more = f" (+{len(present) - _SHOWN} more)" if len(present) > _SHOWN else ""
                raise SelectionError(f"{where}: value(s) {absent} never occur in column {p.column!r} "
                                     f"({column.dtype}); present: {shown}{more}")
            mask = column.isin(p.values).to_numpy()
        else:
            mask = self._range_mask(column, where)
        keep = ~mask if p.exclude else mask
        self.stats = {"n_docs": len(docs), "n_removed": int((~keep).sum())}
        return keep
