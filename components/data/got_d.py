"""GOT-D: select the documents whose mass most lowers the OT distance to the target (Kang et al. 2024).

What follows the paper (arXiv 2405.02774) and its code (the anonymous ``DV4LLM`` repository,
``pre_process+OT_selection/ot-selection.ipynb``, read through the code index):

- The candidate pool stands in for the pretraining distribution; light fine-tuning moves the
  model's effective distribution towards the selected data, so the best data is the data whose
  added mass lowers OT(candidates, target) the most: the *most negative* gradient of the OT
  distance with respect to a candidate's probability mass.
- That gradient is the candidate's dual potential ``u_i`` of the OT problem between uniform
  candidate and uniform target masses, "calibrated" as in LAVA (Just et al. 2023) so that moving
  mass to ``i`` takes it evenly from the other candidates: ``g_i = u_i - mean_{j != i} u_j``.
  The notebook ranks candidates by ascending ``g`` and keeps the head; here ``score = -g``.
- Embeddings: the notebook mean-pools the last hidden states of a (target-fine-tuned)
  DistilBERT over each text, and ott-jax's ``PointCloud`` default cost, the *squared Euclidean*
  distance, so ``cost="sqeuclidean"`` is the default. The notebook solves an entropic OT
  (Sinkhorn, epsilon 0.1, on a GPU); the default here is the exact solver (``ot.emd``), with
  ``solver="sinkhorn"`` for large problems.

What is ours:

- Embeddings come from a ``reference`` model input (``mean_pooled_states``) when one is given;
  otherwise from L2-normalised TF-IDF-weighted hashed word uni+bigram counts (``log(1+tf)``
  times a smoothed IDF fitted on the fit sample and the target). That fallback is our choice,
  not the paper's: it lets GOT-D run without any model.
- Streaming. The paper solves one OT problem over the whole candidate set. The select stage
  scores shard by shard, in parallel, and shards are not random (the corpus writes them in
  source order), so one OT problem per shard would calibrate every shard against its own mix
  and scores would not be comparable across shards. Instead ``fit`` solves the OT problem once
  between the seeded pool sample (``fit_sample_docs``, a uniform sample of the whole pool) and
  the target, and ``score`` extends the candidate potential to any document by the c-transform
  of the fixed target potential, ``u(x) = min_j C(x, y_j) - v_j`` (the soft-min for Sinkhorn).
  For a document of the fit sample this is exactly its solved dual potential (complementary
  slackness), and for any other document it is the gradient of the same OT distance with
  respect to mass added at ``x``. So a score is a pure per-document function, independent of
  shard boundaries, and all scores are calibrated against the same sample: ``g(x) = u(x) -
  mean_fit_sample(u)``, which is LAVA's calibrated gradient up to the factor ``N/(N-1)``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field
from scipy.special import logsumexp

from components.data.hashed_ngrams import hashed_ngram_counts
from components.data.lm_scoring import check_tokenizer_matches, mean_pooled_states
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, SelectionError
from components.registry import Paper

_ROWS_PER_BLOCK = 2048  # bounds the (documents x target) cost block held in memory


def pairwise_cost(x, y, cost: str) -> np.ndarray:
    """(len(x), len(y)) cost matrix between rows of ``x`` and ``y`` (dense arrays or CSR)."""
    xy = x @ y.T
    xy = np.asarray(xy.toarray() if sp.issparse(xy) else xy, dtype=np.float64)
    xx = _row_sq_norms(x)
    yy = _row_sq_norms(y)
    if cost == "cosine":
        norms = np.sqrt(xx)[:, None] * np.sqrt(yy)[None, :]
        return 1.0 - np.divide(xy, norms, out=np.zeros_like(xy), where=norms > 0)
    sq = np.maximum(xx[:, None] + yy[None, :] - 2.0 * xy, 0.0)  # rounding can dip below zero
    if cost == "sqeuclidean":
        return sq
    if cost == "euclidean":
        return np.sqrt(sq)
    raise ValueError(f"unknown cost {cost!r}; expected sqeuclidean, euclidean or cosine")


def _row_sq_norms(x) -> np.ndarray:
    if sp.issparse(x):
        return np.asarray(x.multiply(x).sum(axis=1), dtype=np.float64).ravel()
    x = np.asarray(x, dtype=np.float64)
    return np.einsum("ij,ij->i", x, x)


def solve_ot(cost: np.ndarray, solver: str = "emd", reg: float | None = None, max_iter: int = 100_000,
             a: np.ndarray | None = None, b: np.ndarray | None = None) -> dict:
    """OT between candidate masses ``a`` (rows) and target masses ``b`` (columns), uniform by default.

    Returns the transport cost ``distance``, the candidate potential ``u`` and the target
    potential ``v`` (for Sinkhorn: potentials with ``plan = exp((u_i + v_j - C_ij) / reg)``).
    """
    import ot  # POT: imported here so importing the registry stays cheap

    n, m = cost.shape
    a = np.full(n, 1.0 / n) if a is None else np.asarray(a, dtype=np.float64)
    b = np.full(m, 1.0 / m) if b is None else np.asarray(b, dtype=np.float64)
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if solver == "emd":
        plan, log = ot.emd(a, b, cost, numItermax=max_iter, log=True)
        if log["result_code"] != 1:
            raise SelectionError(
                f"the exact OT solver stopped without an optimum ({log['warning']}); raise emd_max_iter "
                f"(now {max_iter}) or use solver='sinkhorn'")
        return {"distance": float(log["cost"]), "u": np.asarray(log["u"]), "v": np.asarray(log["v"]), "reg": None}
    if solver == "sinkhorn":
        plan, log = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=max_iter, log=True, warn=False)
        # POT's log-scalings absorb log a and log b: u = reg * log_u is the potential of the plan's rows.
        u, v = reg * np.asarray(log["log_u"]), reg * np.asarray(log["log_v"])
        return {"distance": float(np.sum(plan * cost)), "u": u, "v": v, "reg": float(reg),
                "sinkhorn_error": float(log["err"][-1]) if log.get("err") else float("nan")}
    raise ValueError(f"unknown solver {solver!r}; expected emd or sinkhorn")


def c_transform(cost: np.ndarray, v: np.ndarray, reg: float | None) -> np.ndarray:
    """Candidate potential of each row of ``cost`` given the target potential ``v``.

    Exact OT: ``min_j C_ij - v_j``. Entropic OT: the soft-min ``-reg * logsumexp_j((v_j - C_ij)/reg)``.
    """
    if reg is None:
        return np.min(cost - v[None, :], axis=1)
    return -reg * logsumexp((v[None, :] - cost) / reg, axis=1)


def calibrated_gradients(u: np.ndarray) -> np.ndarray:
    """LAVA's calibrated gradient ``u_i - mean_{j != i} u_j``: the change of the OT distance when
    mass moves to candidate ``i`` evenly from all the others."""
    n = len(u)
    if n < 2:
        raise ValueError("calibrated gradients need at least 2 candidates")
    return u - (u.sum() - u) / (n - 1)


class HashedTfidfEmbedder:
    """L2-normalised ``log(1 + tf) * idf`` over hashed word uni+bigrams; IDF fitted once."""

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self.idf: np.ndarray | None = None

    def fit(self, texts) -> "HashedTfidfEmbedder":
        counts = hashed_ngram_counts(texts, self.num_buckets)
        df = np.bincount(counts.indices, minlength=self.num_buckets)  # CSR: one entry per (doc, bucket)
        self.idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0  # smoothed, as in scikit-learn
        return self

    def embed(self, texts) -> sp.csr_matrix:
        tf = hashed_ngram_counts(texts, self.num_buckets, dtype=np.float64).log1p()
        weighted = sp.csr_matrix(tf.multiply(self.idf[None, :]))
        norms = np.sqrt(_row_sq_norms(weighted))
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return sp.csr_matrix(sp.diags(scale) @ weighted)


class GotD(ScoringSelector):
    """GOT-D: keep the documents with the most negative calibrated OT gradient towards the target."""

    key = "got_d"
    paper = Paper(title="Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs",
                  url="https://arxiv.org/abs/2405.02774", arxiv="2405.02774")
    needs_target = True

    class Params(BudgetParams):
        embedding: Literal["auto", "reference", "hashed_ngrams"] = Field(
            "auto", description="auto: the reference model's mean-pooled states if a `reference` input is "
                                "given, else hashed n-gram TF-IDF vectors")
        max_tokens: int = Field(256, ge=1, description="tokens per document embedded by the reference model")
        batch_size: int = Field(16, ge=1, description="documents per reference-model forward pass")
        num_buckets: int = Field(4096, ge=16, description="hash buckets of the n-gram embedding")
        cost: Literal["sqeuclidean", "euclidean", "cosine"] = Field(
            "sqeuclidean", description="ground cost between embeddings (the reference code's: squared Euclidean)")
        solver: Literal["emd", "sinkhorn"] = Field(
            "emd", description="exact OT (network simplex) or entropic OT (log-domain Sinkhorn) for big problems")
        sinkhorn_reg: float = Field(0.05, gt=0, description="Sinkhorn regularisation, relative to the mean cost")
        emd_max_iter: int = Field(1_000_000, ge=1, description="network-simplex iteration cap of the exact solver")
        sinkhorn_max_iter: int = Field(1000, ge=1, description="iteration cap of the Sinkhorn solver")

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}
        self._fitted = None
        self._model = self._tokenizer = self._embedder = None

    def _embed(self, texts: list[str], progress: bool = False):
        if self._embedder is not None:
            return self._embedder.embed(texts)
        return mean_pooled_states(self._model, self._tokenizer, texts, self.params.max_tokens,
                                  self.params.batch_size, progress=progress).astype(np.float64)

    def fit(self, context: SelectionContext) -> None:
        p = self.params
        if context.target is None or context.target.empty:
            raise SelectionError(f"{context.stage}: got_d needs a non-empty target set")
        pool = context.pool_sample
        if pool is None or len(pool) < 2:
            raise SelectionError(f"{context.stage}: got_d needs a pool sample of at least 2 documents "
                                 f"(fit_sample_docs={p.fit_sample_docs})")
        use_model = p.embedding == "reference" or (p.embedding == "auto" and context.references)
        if use_model and not context.references:
            raise SelectionError(f"{context.stage}: embedding='reference' needs a `reference` model input")
        pool_texts, target_texts = pool["text"].tolist(), context.target["text"].tolist()
        if use_model:
            self._model, self._tokenizer, self._embedder = context.references[0].model, context.tokenizer, None
            check_tokenizer_matches(self._model, self._tokenizer, context.stage)
        else:
            self._model = self._tokenizer = None
            self._embedder = HashedTfidfEmbedder(p.num_buckets).fit(pool_texts + target_texts)
        target = self._embed(target_texts, context.progress)
        cost = pairwise_cost(self._embed(pool_texts, context.progress), target, p.cost)
        reg = p.sinkhorn_reg * float(cost.mean()) if p.solver == "sinkhorn" else None
        if reg is not None and reg <= 0:
            raise SelectionError(f"{context.stage}: every candidate-target cost is 0; nothing to transport")
        max_iter = p.emd_max_iter if p.solver == "emd" else p.sinkhorn_max_iter
        solution = solve_ot(cost, p.solver, reg, max_iter)
        u_pool = c_transform(cost, solution["v"], solution["reg"])
        gradients = u_pool - u_pool.mean()
        self._fitted = {"target": target, "v": solution["v"], "reg": solution["reg"], "offset": float(u_pool.mean())}
        self.facts = {
            "ot_distance": solution["distance"],
            "ot_candidates": float(len(pool_texts)),
            "ot_targets": float(len(target_texts)),
            "ot_mean_cost": float(cost.mean()),
            "gradient_std": float(gradients.std()),
            "gradient_negative_fraction": float((gradients < 0).mean()),
            # exact OT: the c-transform reproduces the solver's candidate duals (up to the centring shift)
            "c_transform_gap": float(np.ptp(u_pool - solution["u"])),
        }
        if "sinkhorn_error" in solution:
            self.facts["sinkhorn_marginal_error"] = solution["sinkhorn_error"]

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        if self._fitted is None:
            raise RuntimeError("GotD.score called before fit")
        f = self._fitted
        texts = docs["text"].tolist()
        out = np.empty(len(texts))
        for start in range(0, len(texts), _ROWS_PER_BLOCK):
            block = texts[start : start + _ROWS_PER_BLOCK]
            cost = pairwise_cost(self._embed(block), f["target"], self.params.cost)
            out[start : start + len(block)] = c_transform(cost, f["v"], f["reg"])
        return -(out - f["offset"])  # most negative calibrated gradient first
