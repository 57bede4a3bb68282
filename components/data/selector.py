"""Base class of data selectors: methods that decide which documents to keep."""
from __future__ import annotations

import numpy as np
import pandas as pd

from components.registry import Method


class Selector(Method):
    """Decides per document whether to keep it. Selectors never see ``noise_label``.

    ``stats`` holds counts by removal reason from the last call, for logging.
    """

    def __init__(self, params=None):
        super().__init__(params)
        self.stats: dict = {}

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement keep_mask()")

    def select(self, docs: pd.DataFrame) -> np.ndarray:
        """Keep mask for ``docs`` computed without the ground-truth ``noise_label`` column."""
        blind = docs.drop(columns=["noise_label"], errors="ignore")
        assert "noise_label" not in blind.columns, "selectors must not see noise_label"
        mask = np.asarray(self.keep_mask(blind))
        if mask.dtype != bool or mask.shape != (len(docs),):
            raise ValueError(
                f"{type(self).__name__}.keep_mask returned {mask.dtype} array of shape {mask.shape}; "
                f"expected bool of shape ({len(docs)},)"
            )
        return mask
