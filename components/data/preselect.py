"""PreSelect (Shum et al. 2025, "Predictive Data Selection"): keep the documents whose loss
ranks a ladder of models the way the models' benchmark scores rank them.

Follows the reference code (``data_processing/fasttext/train_fasttext.py`` of the PreSelect
repository, read in the fork zephyr-atomi/PreSelect; hkust-nlp/PreSelect itself was not
available to read):

- every model of the ladder has a benchmark score; every document of a sample of the pool has
  one loss per model;
- ``score(d)`` = number of model pairs (i, j) where i's benchmark is better than j's and
  ``loss_i(d) < loss_j(d)``; a pair with equal benchmarks, or a tie in loss, counts nothing;
- positives are the documents with a perfect score (every ranked pair agrees; 15 for the code's
  6 models), negatives the same number of documents with the lowest scores;
- a fast n-gram classifier is trained on positives vs negatives and its score on each pool
  document decides what is kept.

The loss: the code compares each document's ``total_loss`` (summed nats over its tokens,
``data_processing/bpc/main.py``); the README speaks of normalised loss / BPC. Here every
reference shares the `tokenizer` input, so a document has the same tokens under every model and
the summed loss, the mean loss per token (``document_losses``, used here) and BPC order the models
identically on the tokens scored. Documents are truncated to ``max_tokens`` (the code scores whole
documents), so on longer documents the ordering is that of their first ``max_tokens`` tokens.

Deviations and guesses:

- the benchmark is each model's mean per-document loss on the target set (lower = better), not a
  downstream accuracy average: the target set is what the selection should predict;
- the classifier is ``HashedNgramClassifier`` (logistic regression on hashed unigrams + bigrams),
  not fastText: the ``fasttext`` package does not build into a working module on this Python
  (see ``ngram_classifier.py``). The score is its log-odds of "positive";
- if no document of the sample has a perfect score (possible with many models and a small
  sample), the positives are the documents with the highest score present (``facts`` records
  which score that was); the code would have no positives;
- negatives are the documents below the positive score, lowest scores first as in the code's
  sorted scan; ties are broken in a seeded random order (the code keeps its file order).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from components.data.lm_scoring import check_tokenizer_matches, document_losses
from components.data.ngram_classifier import HashedNgramClassifier
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, SelectionError
from components.registry import Paper


def pair_agreement_scores(benchmark_losses: np.ndarray, doc_losses: np.ndarray) -> tuple[np.ndarray, int]:
    """PreSelect's per-document score and its maximum.

    ``benchmark_losses``: (n_models,), lower = better model. ``doc_losses``: (n_models, n_docs).
    Returns the number of ranked model pairs each document orders like the benchmark, and the
    number of ranked pairs (pairs whose benchmarks differ): the perfect score.
    """
    bench = np.asarray(benchmark_losses, dtype=np.float64)
    losses = np.asarray(doc_losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] != bench.shape[0]:
        raise ValueError(f"doc_losses must be (n_models={bench.shape[0]}, n_docs); got shape {losses.shape}")
    scores = np.zeros(losses.shape[1], dtype=np.int64)
    n_pairs = 0
    for i in range(len(bench)):
        for j in range(len(bench)):
            if bench[i] < bench[j]:  # i is the better model
                n_pairs += 1
                scores += losses[i] < losses[j]
    return scores, n_pairs


def label_by_pair_score(scores: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Positive and negative document positions, and the score that made a positive.

    Positives: the documents with the perfect score ``n_pairs`` (or, if none has it, the highest
    score present). Negatives: as many documents below that score, lowest scores first; ties are
    broken in a seeded random order.
    """
    scores = np.asarray(scores)
    if len(scores) == 0 or scores.max() == scores.min():
        raise ValueError("pair scores must not all be equal: no document would be a negative")
    positive_score = n_pairs if (scores == n_pairs).any() else int(scores.max())
    positives = np.flatnonzero(scores == positive_score)
    rest = np.flatnonzero(scores < positive_score)
    tiebreak = np.random.default_rng([seed, 1]).permutation(len(rest))
    negatives = rest[np.lexsort((tiebreak, scores[rest]))][: len(positives)]
    return positives, negatives, int(positive_score)


class PreSelect(ScoringSelector):
    key = "preselect"
    paper = Paper(title="Predictive Data Selection: The Data That Predicts Is the Data That Teaches",
                  url="https://arxiv.org/abs/2503.00808", arxiv="2503.00808")
    needs_target = True
    needs_tokenizer = True
    min_references = 3  # a ladder: fewer than 3 models leaves at most one ranked pair

    class Params(BudgetParams):
        max_tokens: int = Field(256, ge=1, description="score each document's first max_tokens tokens")
        batch_size: int = Field(16, ge=1, description="documents per forward pass")
        num_buckets: int = Field(1 << 18, ge=2, description="hash buckets of the classifier's n-gram features")
        l2: float = Field(1e-3, gt=0, description="L2 penalty of the classifier's logistic loss")
        max_iter: int = Field(200, ge=1, description="L-BFGS iterations of the classifier")
        heldout_fraction: float = Field(
            0.2, gt=0, lt=1, description="share of labelled documents held out to measure the classifier")

    def fit(self, context: SelectionContext) -> None:
        where = f"{context.stage} ({self.key})"
        p = self.params
        references = context.references
        if len(references) < self.min_references:
            raise SelectionError(f"{where}: needs a ladder of at least {self.min_references} `reference` models, "
                                 f"got {len(references)}")
        if context.target is None or context.target.empty:
            raise SelectionError(f"{where}: needs a non-empty target set to rank the reference models")
        if context.pool_sample is None or context.pool_sample.empty:
            raise SelectionError(f"{where}: needs a non-empty pool sample to label")
        for ref in references:
            check_tokenizer_matches(ref.model, context.tokenizer, f"{where}, reference {ref.name!r}")

        def losses(model, texts):
            return document_losses(model, context.tokenizer, list(texts), max_tokens=p.max_tokens,
                                   batch_size=p.batch_size, progress=context.progress)

        bench = np.array([np.nanmean(losses(ref.model, context.target["text"])) for ref in references])
        pool = context.pool_sample.reset_index(drop=True)
        doc_losses = np.stack([losses(ref.model, pool["text"]) for ref in references])
        scored = np.isfinite(doc_losses).all(axis=0)  # as the code: only docs every model scored
        scores, n_pairs = pair_agreement_scores(bench, doc_losses[:, scored])
        texts = pool["text"][scored].tolist()
        if n_pairs == 0:
            raise SelectionError(f"{where}: the reference models have equal target losses {bench.tolist()}; "
                                 f"the ladder needs models of different quality")
        if len(scores) == 0 or scores.max() == scores.min():
            raise SelectionError(
                f"{where}: every pool-sample document got the same pair score "
                f"({int(scores.max()) if len(scores) else 'none scored'}), so there are no positives and negatives; "
                f"use reference models of more different quality or a larger fit_sample_docs")

        positives, negatives, positive_score = label_by_pair_score(scores, n_pairs, p.seed)
        idx = np.concatenate([positives, negatives])
        labels = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)])
        labelled = [texts[i] for i in idx]
        ids = pool["id"][scored].to_numpy()
        #: the training labels, for inspection (which pool documents were positive or negative)
        self.labelled = pd.DataFrame({"id": ids[idx], "label": labels, "pair_score": scores[idx]})

        def classifier():
            return HashedNgramClassifier(num_buckets=p.num_buckets, l2=p.l2, max_iter=p.max_iter)

        self.facts = {
            "positives": float(len(positives)),
            "negatives": float(len(negatives)),
            "positive_score": float(positive_score),
            "ranked_pairs": float(n_pairs),
            "pool_mean_pair_score": float(scores.mean()),
        }
        for ref, value in zip(references, bench):
            self.facts[f"benchmark_loss_{ref.name}"] = float(value)
        # Held-out accuracy: a seeded stratified split, with a classifier fitted on the rest only.
        rng = np.random.default_rng([p.seed, 2])
        held = np.zeros(len(idx), dtype=bool)
        for cls in (0, 1):
            members = np.flatnonzero(labels == cls)
            n_held = int(round(p.heldout_fraction * len(members)))
            if 0 < n_held < len(members):
                held[rng.permutation(members)[:n_held]] = True
        if held.any() and len(np.unique(labels[~held])) == 2:
            texts_train = [labelled[i] for i in np.flatnonzero(~held)]
            texts_held = [labelled[i] for i in np.flatnonzero(held)]
            probe = classifier().fit(texts_train, labels[~held])
            self.facts["classifier_heldout_accuracy"] = probe.accuracy(texts_held, labels[held])
        # The classifier that scores the pool is trained on every labelled document, as the code does.
        self._classifier = classifier().fit(labelled, labels)
        self.facts["classifier_train_accuracy"] = self._classifier.accuracy(labelled, labels)

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        if not hasattr(self, "_classifier"):
            raise ValueError(f"{self.key}: call fit() before score()")
        return self._classifier.decision_function(docs["text"].tolist())
