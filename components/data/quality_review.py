"""1.5-Pints' curation loop: a quality classifier, and a person reviewing the borderline documents.

"1.5-Pints Technical Report: Pretraining in Days, Not Months" (Tan et al. 2024, arXiv 2408.03506)
builds a small, high-quality pretraining set with automated quality filtering plus human review.
Here, as one select stage run twice:

1. **Classify.** A hashed n-gram logistic regression (``HashedNgramClassifier``) learns "like
   the target set" (the positives: held-out documents of a high-quality domain) against a seeded
   sample of the pool (the negatives); every training document is scored by its log-odds and the
   budget keeps the best. The stage also writes ``review_queue.jsonl`` into its artifact: the
   ``review_size`` documents closest to the cut, half just kept and half just dropped, each with
   its id, domain, score, text and an empty ``label``.
2. **Review.** A person fills each ``label`` with ``keep`` or ``drop`` and saves the file where
   ``review_labels`` points (e.g. ``params/reviews/<recipe>.jsonl``). That file is an input of
   the stage (hashed into its digest), so saving it reruns exactly this stage and what follows:
   the labelled documents join the classifier's training set (keep = positive, drop = negative)
   and their own scores are set by the label (kept first, dropped last).

What is ours, not the paper's: the classifier (the paper's filtering pipeline is not released
with code), the borderline rule (nearest the budget cut), and the label file format.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from components.data.ngram_classifier import HashedNgramClassifier
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, SelectionError
from components.registry import Paper

log = logging.getLogger("paperdag.select")
LABELS = {"keep": 1, "drop": 0}
LABELED_SCORE = 1e6  # a reviewed document's score: its label decides, whatever the classifier says


def read_review_labels(path: Path) -> dict[str, tuple[int, str]]:
    """``{id: (1 keep | 0 drop, text)}`` from a reviewed queue; unlabelled lines are skipped."""
    out: dict[str, tuple[int, str]] = {}
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise SelectionError(f"{path}:{line_no}: not a JSON object per line ({type(err).__name__})") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("text"), str):
                raise SelectionError(f"{path}:{line_no}: each line needs string fields id and text (from the queue)")
            label = row.get("label")
            if label in (None, ""):
                continue
            if label not in LABELS:
                raise SelectionError(f"{path}:{line_no}: label must be 'keep', 'drop' or empty, got {label!r}")
            out[row["id"]] = (LABELS[label], row["text"])
    return out


class QualityReview(ScoringSelector):
    """Quality classifier (target vs pool) whose borderline documents go to a person for review."""

    key = "quality_review"
    paper = Paper(title="1.5-Pints Technical Report: Pretraining in Days, Not Months -- Your Language Model "
                        "Thrives on Quality Data", url="https://arxiv.org/abs/2408.03506", arxiv="2408.03506")
    needs_target = True
    #: the select stage writes ``review_queue.jsonl`` (see the module docstring)
    writes_review_queue = True

    class Params(BudgetParams):
        review_size: int = Field(60, ge=2, description="borderline documents written to review_queue.jsonl")
        review_labels: Path | None = Field(
            None, description="a reviewed queue (jsonl with id, text, label keep/drop), relative to where paperdag "
                              "runs; read when the file exists (a warning says when it does not)")
        apply_review: bool = Field(True, description="use the labels; false only reads which documents they cover, so "
                                                     "a classifier-alone stage measures the same unreviewed documents")
        num_buckets: int = Field(1 << 18, ge=2, description="hashed n-gram feature buckets")
        l2: float = Field(1e-3, ge=0, description="logistic regression's L2 penalty")

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}
        self._labels: dict[str, tuple[int, str]] = {}
        self._classifier: HashedNgramClassifier | None = None

    def input_files(self) -> dict[str, list[Path]]:
        path = self.params.review_labels
        return {"review_labels": [Path(path)]} if path is not None and Path(path).exists() else {}

    def fit(self, context: SelectionContext) -> None:
        path = self.params.review_labels
        if path is not None and not Path(path).exists():
            log.warning("%s: review_labels %s does not exist yet (relative to %s); selecting without a review. Label "
                        "this stage's review_queue.jsonl and save it there", context.stage, path, Path.cwd())
        self._labels = read_review_labels(Path(path)) if path is not None and Path(path).exists() else {}
        positives = context.target["text"].tolist()
        negatives = context.pool_sample["text"].tolist()
        reviewed = list(self._labels.values()) if self.params.apply_review else []
        texts = positives + negatives + [text for _, text in reviewed]
        labels = [1] * len(positives) + [0] * len(negatives) + [label for label, _ in reviewed]
        self._classifier = HashedNgramClassifier(num_buckets=self.params.num_buckets, l2=self.params.l2).fit(
            texts, labels)
        self.facts = {"review_labels_used": len(reviewed), "review_labels_keep": sum(l for l, _ in reviewed),
                      "classifier_positives": len(positives), "classifier_negatives": len(negatives)}

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        if self._classifier is None:
            raise RuntimeError("QualityReview.score called before fit")
        scores = self._classifier.decision_function(docs["text"].tolist())
        if self.params.apply_review:
            for i, doc_id in enumerate(docs["id"]):
                if doc_id in self._labels:
                    scores[i] = LABELED_SCORE if self._labels[doc_id][0] else -LABELED_SCORE
        return scores

    def reviewed_ids(self) -> set[str]:
        """Documents whose label this stage applied (they leave the next review queue)."""
        return set(self._labels) if self.params.apply_review else set()

    def labeled_ids(self) -> set[str]:
        """Documents the label file covers, applied or not: left out of the ``_unreviewed``
        metrics, so a stage with and one without the review are measured on the same documents."""
        return set(self._labels)


def borderline(scores: np.ndarray, keep: np.ndarray, size: int, exclude: np.ndarray) -> np.ndarray:
    """Positions of the ``size`` documents nearest the budget cut (about half kept, half dropped),
    skipping ``exclude`` (documents already reviewed)."""
    order = np.argsort(-scores, kind="stable")
    candidates = order[~exclude[order]]
    kept_sorted = candidates[keep[candidates]]
    dropped_sorted = candidates[~keep[candidates]]
    half = size // 2
    low_kept = kept_sorted[-(size - half):] if len(kept_sorted) else kept_sorted
    high_dropped = dropped_sorted[:half]
    return np.concatenate([low_kept, high_dropped])
