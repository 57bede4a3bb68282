"""Base class of corpus builders: methods that produce the raw document table."""
from __future__ import annotations

import pandas as pd

from components.registry import Method


class CorpusBuilder(Method):
    """Builds a document table that satisfies ``schema.DOCUMENT_SCHEMA``."""

    def build(self) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} must implement build()")
