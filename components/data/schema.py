"""The document table every data stage reads and writes, and its validation.

One row per document. ``noise_label`` is ground truth for injected noise ("" = clean); it exists
so selection can be scored, and selectors never see it (see ``selector.Selector.select``).
"""
from __future__ import annotations

import pandas as pd
import pandera.pandas as pa

SPLITS = ("train", "validation", "test")
NOISE_KINDS = ("boilerplate", "gibberish", "exact_duplicate", "near_duplicate", "spam")
DOCUMENT_COLUMNS = ("id", "text", "domain", "source", "split", "noise_label")


class DataValidationError(ValueError):
    """A document table (or the file holding it) does not satisfy DOCUMENT_SCHEMA."""


def _non_blank(text: pd.Series) -> pd.Series:
    return text.str.strip().str.len() > 0


DOCUMENT_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(str, unique=True, description="stable unique document id"),
        "text": pa.Column(str, pa.Check(_non_blank, name="text_not_blank"), description="document text"),
        "domain": pa.Column(str, description="e.g. prose / code / arithmetic"),
        "source": pa.Column(str, description="which corpus source produced the row"),
        "split": pa.Column(str, pa.Check.isin(SPLITS), description="train / validation / test"),
        "noise_label": pa.Column(
            str, pa.Check.isin(("",) + NOISE_KINDS), description='"" for clean docs, else the noise kind'
        ),
    },
    strict=False,  # score columns added by selectors are allowed
    name="documents",
)

_MAX_GROUPS_SHOWN = 8
_MAX_EXAMPLES = 3


def _summarize(failure_cases: pd.DataFrame) -> str:
    """One line per (column, check) with a count and a few example values, not the whole table."""
    lines = []
    cases = failure_cases.fillna({"column": "<table>"}).astype({"column": str, "check": str})
    groups = list(cases.groupby(["column", "check"], sort=True))
    for (column, check), group in groups[:_MAX_GROUPS_SHOWN]:
        examples = ", ".join(repr(v)[:40] for v in group["failure_case"].head(_MAX_EXAMPLES))
        lines.append(f"  column {column!r}: check {check} failed for {len(group)} value(s), e.g. {examples}")
    if len(groups) > _MAX_GROUPS_SHOWN:
        lines.append(f"  ... and {len(groups) - _MAX_GROUPS_SHOWN} more failing checks")
    return "\n".join(lines)


def validate_documents(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a document table; on failure raise DataValidationError naming ``where``."""
    if not isinstance(df, pd.DataFrame):
        raise DataValidationError(f"{where}: expected a pandas DataFrame, got {type(df).__name__}")
    try:
        return DOCUMENT_SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        summary = _summarize(err.failure_cases)
        raise DataValidationError(f"{where}: document table fails DOCUMENT_SCHEMA:\n{summary}") from None
    except pa.errors.SchemaError as err:  # non-lazy failures (e.g. wrong object type)
        raise DataValidationError(f"{where}: document table fails DOCUMENT_SCHEMA: {err}") from None
