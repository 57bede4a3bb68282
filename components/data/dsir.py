"""DSIR: data selection by importance resampling on hashed n-gram features (Xie et al. 2023).

Two bag-of-hashed-n-grams distributions are fitted, one on the target documents and one on the raw
pool; a document's log importance weight is ``counts · (log p_target - log p_raw)``, the log
likelihood ratio of the document under the two models. Resampling the pool with these weights
(without replacement) yields documents that look like the target.

Follows the paper and the reference implementation (p-lambda/dsir, PyPI ``data-selection`` 1.0.3,
``HashedNgramDSIR``; read in its source):

- features: lower-cased text split with NLTK's ``wordpunct`` pattern (``\\w+|[^\\w\\s]+``; the
  reference's default tokenizer), unigrams + bigrams (``ngrams=2``), hashed into ``num_buckets``
  (default 10000);
- both distributions are plain normalised counts; ``log_diff = log(p_target + 1e-8) -
  log(p_raw + 1e-8)``; the log weight is ``np.dot(log_diff, counts)``, not normalised by length;
- documents shorter than ``min_example_length`` words (default 100, the reference's
  ``perexample_metadata_filter``) rank after every longer document (see deviations);
- resampling is Gumbel top-k: standard Gumbel noise added to the log weights, then the top
  documents (sampling without replacement, proportional to the weights); ``top_k=True`` skips the
  noise (the reference's ``resample(top_k=True)``);
- ``target_laplace_smoothing``: a pseudo-count added to every target bucket (the reference's
  GitHub main has it, 1.0.3 does not; default 0 = 1.0.3).

Deviations, all deliberate:

- hashing: CRC32 of each word, and a 64-bit mix of the two words' CRC32s for a bigram
  (``components.data.hashed_ngrams``), instead of SHA-256 of the n-gram string: much faster and
  still stable across processes. Bucket assignments therefore differ from the reference's, so
  scores agree only statistically (the benchmark measures the overlap of the two selections);
- the raw distribution is fitted on the select stage's seeded uniform sample of the pool
  (``fit_sample_docs``), not on the first ``100000 * num_buckets`` n-grams in file order;
- Gumbel noise is drawn per document from a hash of ``(seed, id)``, not from the global numpy
  RNG, so a score does not depend on shard boundaries or order and a seed reproduces a selection;
- the reference never selects a short document; here short documents rank below every other one
  (their log weight minus ``SHORT_PENALTY``), so a budget larger than the long documents still
  fills instead of failing; the budget itself is the select stage's (tokens or a fraction).

Measured (benchmarks/bench_data_selection.py, quickstart corpus, prose validation docs as target,
top 10%): the selection overlaps the reference's at Jaccard 0.84 (Spearman 0.985 between the two
log weights), both select ~0.9 prose from a pool of 0.2. Log weights of documents of 100+ words
differ by tens of nats, so the Gumbel noise rarely changes which documents are kept, on both sides.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
from pydantic import Field

from components.data.hashed_ngrams import hashed_ngram_counts
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, SelectionError, document_uniforms
from components.registry import Paper

EPS = 1e-8  # the reference's floor inside both logs
# Subtracted from a short document's score: far above any |log weight| (|log_diff| <= log(1e8) ~ 18.4,
# so a document would need ~5e10 n-grams to reach it), small enough that float64 keeps ~1e-4 resolution.
SHORT_PENALTY = 1e12


def gumbel_noise(ids, seed: int) -> np.ndarray:
    """Standard Gumbel noise, one draw per document, a pure function of ``(seed, id)``."""
    return -np.log(-np.log(document_uniforms(ids, seed)))


class DSIR(ScoringSelector):
    key = "dsir"
    paper = Paper(title="Data Selection for Language Models via Importance Resampling",
                  url="https://arxiv.org/abs/2302.03169", arxiv="2302.03169")
    needs_target = True

    class Params(BudgetParams):
        num_buckets: int = Field(10_000, ge=1, description="hash buckets of the n-gram features")
        ngrams: int = Field(2, ge=1, le=2, description="1 = unigrams, 2 = unigrams and bigrams")
        top_k: bool = Field(False, description="deterministic top-k by log weight instead of Gumbel resampling")
        min_example_length: int = Field(
            100, ge=0, description="documents with fewer words rank below all others (0 = off)")
        target_laplace_smoothing: float = Field(
            0.0, ge=0, description="pseudo-count added to every target bucket (small target sets)")

    def __init__(self, params=None):
        super().__init__(params)
        self.log_diff: np.ndarray | None = None
        self.facts: dict = {}

    @property
    def _orders(self) -> tuple[int, ...]:
        return tuple(range(1, self.params.ngrams + 1))

    def _bucket_counts(self, texts, where: str) -> np.ndarray:
        counts = np.asarray(hashed_ngram_counts(texts, self.params.num_buckets, self._orders, dtype=np.float64)
                            .sum(axis=0)).ravel()
        if counts.sum() == 0:
            raise SelectionError(f"{self.key}: {where} has no words to count n-grams of")
        return counts

    def fit(self, context: SelectionContext) -> None:
        if context.target is None or context.target.empty:
            raise SelectionError(f"{context.stage}: {self.key} needs a non-empty target set")
        if context.pool_sample is None or context.pool_sample.empty:
            raise SelectionError(
                f"{context.stage}: {self.key} needs a non-empty pool sample to fit the raw distribution")
        raw = self._bucket_counts(context.pool_sample["text"].tolist(), f"{context.stage}: the pool sample")
        target = self._bucket_counts(context.target["text"].tolist(), f"{context.stage}: the target set")
        p_raw = raw / raw.sum()
        smoothed = target + self.params.target_laplace_smoothing
        p_target = smoothed / smoothed.sum()
        self.log_diff = np.log(p_target + EPS) - np.log(p_raw + EPS)
        support = p_target > 0
        self.facts = {
            # KL(target || raw) over hashed n-grams, with the same 1e-8 floors as log_diff
            "kl_target_raw": float(np.sum(p_target[support] * self.log_diff[support])),
            "target_ngrams": float(target.sum()),
            "raw_ngrams": float(raw.sum()),
            "fit_pool_docs": float(len(context.pool_sample)),
        }

    def log_weights(self, docs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(log importance weight, word count) per document, without noise or length rule."""
        if self.log_diff is None:
            raise RuntimeError(f"{self.key}: call fit() before scoring")
        counts = hashed_ngram_counts(docs["text"].tolist(), self.params.num_buckets, self._orders, dtype=np.float64)
        n_ngrams = np.asarray(counts.sum(axis=1)).ravel()
        # words from n-gram counts, as the reference's get_perexample_metadata: n + (n - 1) bigrams
        n = self.params.ngrams
        words = np.floor((n_ngrams + n * (n - 1) / 2) / n)
        return counts @ self.log_diff, words

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        weights, words = self.log_weights(docs)
        if not self.params.top_k:
            weights = weights + gumbel_noise(docs["id"].tolist(), self.params.seed)
        return np.where(words < self.params.min_example_length, weights - SHORT_PENALTY, weights)
