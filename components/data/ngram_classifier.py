"""A fast binary text classifier on hashed word n-grams: PreSelect's stand-in for fastText.

PreSelect (``train_fasttext.py``) trains ``fasttext.train_supervised(epoch=3, lr=0.1,
wordNgrams=2)`` on ``__label__1/0`` lines. We tried ``pip install fasttext`` on this project's
Python (3.11, NumPy 2): 0.9.3 ships no wheel, so it compiles from source (~70 s, a C++ compiler
on every machine), and its ``predict`` then fails under NumPy 2 (``np.array(..., copy=False)``);
the upstream repository is archived. So this module is the classifier instead.

What follows fastText: the features are word unigrams plus hashed word bigrams
(``wordNgrams=2``), and the model is linear in the bag of n-grams (fastText averages the
n-grams' embeddings and applies one linear layer: with two labels that is a low-rank linear
model of the averaged counts). Our own choices: words are ``wordpunct`` tokens of lower-cased
text (``hashed_ngram_counts``; fastText splits on whitespace and keeps case); rows are scaled to
unit L2 norm (fastText's average is an L1 scaling); a full-rank weight vector is fitted to the
optimum of the L2-regularised mean logistic loss with L-BFGS (deterministic, no learning rate or
epoch count to tune) instead of 3 epochs of SGD.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize
from scipy.special import expit

from components.data.hashed_ngrams import hashed_ngram_counts


class HashedNgramClassifier:
    """L2-regularised logistic regression on unit-normalised hashed n-gram counts.

    ``decision_function`` returns log-odds of the positive class (label 1); it is a pure
    function of each text, so texts can be scored in any batches.
    """

    def __init__(self, num_buckets: int = 1 << 18, ngram_orders: Sequence[int] = (1, 2), l2: float = 1e-3,
                 max_iter: int = 200):
        if not isinstance(num_buckets, (int, np.integer)) or num_buckets < 2:
            raise ValueError(f"num_buckets must be an integer >= 2, got {num_buckets!r}")
        if not ngram_orders or not set(ngram_orders) <= {1, 2}:
            raise ValueError(f"ngram_orders must be a non-empty subset of (1, 2), got {tuple(ngram_orders)}")
        if not np.isfinite(l2) or l2 <= 0:
            raise ValueError(f"l2 must be a finite number > 0 (it keeps separable data bounded), got {l2!r}")
        if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.num_buckets = int(num_buckets)
        self.ngram_orders = tuple(ngram_orders)
        self.l2 = float(l2)
        self.max_iter = int(max_iter)
        self.weights: np.ndarray | None = None
        self.bias = 0.0
        self.converged = False

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        counts = hashed_ngram_counts(list(texts), self.num_buckets, self.ngram_orders, dtype=np.float64)
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0  # a text without words stays the zero vector: it scores the bias
        return sp.csr_matrix(sp.diags(1.0 / norms) @ counts)

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> "HashedNgramClassifier":
        texts = list(texts)
        y = np.asarray(labels)
        if y.shape != (len(texts),):
            raise ValueError(f"labels must have one entry per text: {len(texts)} texts, labels of shape {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()) - {0, 1})[:5]}")
        if len(np.unique(y)) < 2:
            raise ValueError(f"labels need both classes (0 and 1) to train a classifier; got only {y[:1].tolist()}")
        y = y.astype(np.float64)
        x = self.features(texts)
        n, d = x.shape
        xt = x.T.tocsr()

        def loss_and_grad(theta):
            w, b = theta[:d], theta[d]
            z = x @ w + b
            loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * self.l2 * (w @ w)
            residual = (expit(z) - y) / n
            grad = np.empty_like(theta)
            grad[:d] = xt @ residual + self.l2 * w
            grad[d] = residual.sum()
            return loss, grad

        result = minimize(loss_and_grad, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter})
        self.weights, self.bias = result.x[:d].copy(), float(result.x[d])
        self.converged = bool(result.success)
        return self

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Log-odds that each text is positive (label 1)."""
        if self.weights is None:
            raise ValueError("HashedNgramClassifier is not fitted: call fit() first")
        return self.features(texts) @ self.weights + self.bias

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return expit(self.decision_function(texts))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return (self.decision_function(texts) > 0).astype(np.int64)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        labels = np.asarray(labels)
        if labels.shape != (len(texts),) or len(texts) == 0:
            raise ValueError(f"accuracy needs one label per text and at least one text; got {len(texts)} texts, "
                             f"labels of shape {labels.shape}")
        return float(np.mean(self.predict(texts) == labels))
