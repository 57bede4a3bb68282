"""Base class of evaluators: methods that measure one saved model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from components.registry import Method


class Evaluator(Method):
    """Measures a model on held-out token blocks per domain and on task examples."""

    def evaluate(self, model, tokenizer, model_dir: Path | None, blocks_by_domain: dict[str, np.ndarray],
                 task_examples: list[dict], work_dir: Path, quant_meta: dict | None = None,
                 progress: bool = False) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")
