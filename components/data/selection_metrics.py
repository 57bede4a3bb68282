"""Score a keep mask against injected-noise ground truth (removal = the positive class)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def removal_precision_recall(noise_label: Sequence[str], keep: np.ndarray) -> dict:
    """Precision / recall / F1 of *removing* noise, plus counts and recall per noise kind.

    A document is noise when its label is non-empty. Undefined ratios (nothing removed, no noise)
    are 0.0, as in scikit-learn's ``zero_division=0``.
    """
    labels = np.asarray(noise_label, dtype=object).astype(str)
    keep = np.asarray(keep)
    if keep.dtype != bool or keep.shape != labels.shape:
        raise ValueError(f"keep must be a bool array of shape {labels.shape}, got {keep.dtype} {keep.shape}")
    is_noise = labels != ""
    removed = ~keep
    tp = int(np.sum(removed & is_noise))
    fp = int(np.sum(removed & ~is_noise))
    fn = int(np.sum(keep & is_noise))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n_clean = int(np.sum(~is_noise))
    recall_by_kind = {
        kind: float(np.mean(removed[labels == kind])) for kind in sorted(set(labels[is_noise].tolist()))
    }
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_docs": int(labels.size),
        "n_noise": int(is_noise.sum()),
        "n_removed": int(removed.sum()),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "clean_keep_rate": float(np.sum(keep & ~is_noise) / n_clean) if n_clean else 0.0,
        "recall_by_kind": recall_by_kind,
    }
