"""Arctic-SnowCoder's quality annotator (Wei et al. 2024, arXiv 2409.02326): a linear head on
document embeddings, trained to tell high-quality documents from random ones.

Follows the paper: positives are the high-quality set (here the target documents; the paper
used 220k high-quality code files plus 80k instruction examples), negatives are random documents
of the pool (here ``context.pool_sample``); the head is linear on a frozen encoder's embeddings;
a document's score is the mean of the head's scores of its top, middle and bottom chunks, since
the encoder (Snowflake-arctic-embed-m) sees only 512 tokens at a time. Phase 2 continues
pretraining on the top-scored tokens repeated 4 times: this selector followed by the
``repeat_docs`` transform (see docs/data_selection.md for the three phases as stages).

Different here: the encoder is the mean-pooled hidden state of a `reference` model that the
pipeline trained (``lm_scoring.mean_pooled_states``), not a BERT-style embedder, and the head is
an L2-regularised logistic regression on standardised embeddings with balanced class weights
(the paper does not publish its head's training details or code). The budget is filled
globally; the paper ranks per programming language.

Guessed: chunk length (``chunk_tokens``, also the embedder's context in every mode), the head
is trained on the same chunks it scores (each labelled with its document's class), the mean is
over the distinct chunk positions (a one-chunk document scores its one chunk, a two-chunk
document the mean of both), and the chunk score is the head's probability of "high quality".
``chunking: none`` is the ablation: one embedding of the document's first ``chunk_tokens``
tokens. ``chunking: lines`` cuts every ``chunk_lines`` lines instead of every ``chunk_tokens``
tokens (each chunk still truncated to ``chunk_tokens``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from components.data.lm_scoring import check_tokenizer_matches, mean_pooled_states
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, SelectionError, pick_reference
from components.registry import Paper


def pick_positions(n_chunks: int) -> list[int]:
    """Top, middle and bottom chunk indices, without repeats."""
    return sorted({0, n_chunks // 2, n_chunks - 1}) if n_chunks else []


class SnowCoder(ScoringSelector):
    """Linear quality head on reference-model embeddings; file score = mean of 3 chunk scores."""

    key = "snowcoder"
    paper = Paper(title="Arctic-SnowCoder: Demystifying High-Quality Data in Code Pretraining",
                  url="https://arxiv.org/abs/2409.02326", arxiv="2409.02326")
    needs_target = True
    min_references = 1
    needs_tokenizer = True

    class Params(BudgetParams):
        reference: str | None = Field(None, min_length=1, description="`reference` input stage used as the "
                                                                      "embedder (default: the first)")
        chunking: Literal["tokens", "lines", "none"] = Field(
            "tokens", description="how a document is cut before top/middle/bottom scoring; 'none' embeds the "
                                  "document's first chunk_tokens tokens only (ablation)")
        chunk_tokens: int = Field(128, ge=2, description="tokens per chunk and the embedder's context (the paper's "
                                                         "embedder: 512); capped at the reference model's context")
        chunk_lines: int = Field(20, ge=1, description="lines per chunk with chunking='lines'")
        layer: int = Field(-1, description="hidden-state layer that is mean-pooled (-1: the last)")
        holdout_fraction: float = Field(0.2, ge=0, lt=1, description="documents of each class held out to "
                                                                     "measure the head's accuracy")
        head_c: float = Field(0.1, gt=0, description="inverse L2 strength of the logistic head (sklearn C); "
                                                     "small pools overfit the embedding's noise at C=1")
        batch_size: int = Field(16, ge=1, description="chunks per embedding forward pass")

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}
        self._model = self._tokenizer = None
        self._mean = self._scale = self._coef = None
        self._intercept = 0.0
        self._chunk_tokens = self.params.chunk_tokens

    # ---- chunks and embeddings ---------------------------------------------------------

    def chunks(self, texts: list[str]) -> list[list[str]]:
        """The scored chunks (top, middle, bottom; or the whole document) of each text."""
        p = self.params
        if p.chunking == "none":
            return [[t] for t in texts]
        out = []
        if p.chunking == "lines":
            for text in texts:
                lines = text.splitlines(keepends=True)
                pieces = ["".join(lines[i:i + p.chunk_lines]) for i in range(0, len(lines), p.chunk_lines)]
                pieces = [c for c in pieces if c.strip()] or [text]
                out.append([pieces[i] for i in pick_positions(len(pieces))])
            return out
        encodings = self._tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for text, enc in zip(texts, encodings):
            n = len(enc.ids)
            # char offsets of every chunk_tokens-th token: chunks are exact spans of the text
            step = self._chunk_tokens
            starts = [0] + [enc.offsets[i][0] for i in range(step, n, step)]
            bounds = starts + [len(text)]
            pieces = [text[bounds[i]:bounds[i + 1]] for i in range(len(starts))]
            out.append([pieces[i] for i in pick_positions(len(pieces))] if n else [text])
        return out

    def _chunk_embeddings(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of every scored chunk, the index of the text each chunk belongs to)."""
        per_text = self.chunks(texts)
        flat = [c for cs in per_text for c in cs]
        owner = np.repeat(np.arange(len(texts)), [len(cs) for cs in per_text])
        emb = mean_pooled_states(self._model, self._tokenizer, flat, max_tokens=self._chunk_tokens,
                                 batch_size=self.params.batch_size, layer=self.params.layer,
                                 progress=getattr(self, "_progress", False))
        return emb.astype(np.float64), owner

    def _chunk_probs(self, emb: np.ndarray) -> np.ndarray:
        z = ((emb - self._mean) / self._scale) @ self._coef + self._intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    @staticmethod
    def _doc_mean(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
        return np.bincount(owner, weights=values, minlength=n) / np.maximum(np.bincount(owner, minlength=n), 1)

    # ---- fit / score --------------------------------------------------------------------

    def _train_head(self, emb: np.ndarray, labels: np.ndarray) -> None:
        self._mean = emb.mean(0)
        self._scale = emb.std(0) + 1e-6
        head = LogisticRegression(C=self.params.head_c, class_weight="balanced", max_iter=2000,
                                  random_state=self.params.seed)
        head.fit((emb - self._mean) / self._scale, labels)
        self._coef, self._intercept = head.coef_[0].astype(np.float64), float(head.intercept_[0])

    def _holdout(self, labels: np.ndarray) -> np.ndarray:
        """Seeded, per-class held-out mask over documents (each class keeps >= 1 training doc)."""
        rng = np.random.default_rng([self.params.seed % 2**32, 0x5C0D])
        held = np.zeros(len(labels), dtype=bool)
        for cls in (0, 1):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            n = min(int(round(self.params.holdout_fraction * len(idx))), len(idx) - 1)
            held[idx[:n]] = True
        return held

    def fit(self, context: SelectionContext) -> None:
        where = f"{context.stage}: snowcoder"
        ref = pick_reference(context, self.params.reference, "snowcoder (the embedder)")
        check_tokenizer_matches(ref.model, context.tokenizer, where)
        self._model, self._tokenizer, self._progress = ref.model, context.tokenizer, context.progress
        # a chunk is what the embedder sees at once: never more than the model's context (EOS marker + tokens)
        context_len = getattr(ref.model.config, "max_position_embeddings", None)
        self._chunk_tokens = min(self.params.chunk_tokens, context_len - 1) if context_len else self.params.chunk_tokens
        if self._chunk_tokens < 2:
            raise SelectionError(f"{where}: the reference model's context ({context_len} positions) is too short "
                                 f"to embed chunks")
        if context.target is None or context.target.empty:
            raise SelectionError(f"{where}: the target set (the high-quality positives) is empty")
        if context.pool_sample is None or context.pool_sample.empty:
            raise SelectionError(f"{where}: no pool sample to draw random negatives from")
        positives = context.target["text"].tolist()
        seen = set(positives)
        negatives = [t for t in context.pool_sample["text"] if t not in seen]  # a positive is no negative
        for name, group in (("positive (target)", positives), ("negative (pool sample)", negatives)):
            if len(group) < 2:
                raise SelectionError(f"{where}: needs at least 2 {name} documents to train the head, got {len(group)}")
        texts = positives + negatives
        labels = np.array([1] * len(positives) + [0] * len(negatives))
        emb, owner = self._chunk_embeddings(texts)
        chunk_labels = labels[owner]
        held = self._holdout(labels)
        facts = {"head_positives": len(positives), "head_negatives": len(negatives),
                 "head_chunk_tokens": self._chunk_tokens,
                 "head_chunks_per_doc": len(owner) / len(texts)}
        if held.any():
            train_chunks = ~held[owner]
            self._train_head(emb[train_chunks], chunk_labels[train_chunks])
            doc_scores = self._doc_mean(self._chunk_probs(emb), owner, len(texts))
            predicted = doc_scores >= 0.5
            facts["head_accuracy_train"] = float((predicted[~held] == labels[~held]).mean())
            facts["head_accuracy_holdout"] = float((predicted[held] == labels[held]).mean())
            if len(set(labels[held])) == 2:
                facts["head_auc_holdout"] = float(roc_auc_score(labels[held], doc_scores[held]))
        self._train_head(emb, chunk_labels)  # the head that scores: trained on every document
        doc_scores = self._doc_mean(self._chunk_probs(emb), owner, len(texts))
        facts["head_accuracy_all"] = float(((doc_scores >= 0.5) == labels).mean())
        self.facts = facts

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        if self._coef is None:
            raise RuntimeError("snowcoder: fit() must run before score()")
        texts = docs["text"].tolist()
        if not texts:
            return np.zeros(0)
        emb, owner = self._chunk_embeddings(texts)
        return self._doc_mean(self._chunk_probs(emb), owner, len(texts))
