"""Perplexity filtering (POINTS, Liu et al. 2024): keep the documents a reference model finds
least surprising.

Follows the reference code (WePOINTS ``scripts/pretrain_filtering_with_ppl.py``): each sample's
perplexity is ``exp(-mean log p(token))`` under a reference model, samples are sorted by
ascending perplexity and the lowest-perplexity ones are kept. Since ``exp`` is monotone the score
here is ``-(mean token loss)`` from ``document_losses``: the same order, and finite.

Deviations: POINTS keeps a fixed ``remaining_ratio`` (0.2) of the data; here the stage's budget
(``budget_tokens`` or ``keep_fraction``) decides how much is kept. POINTS scores image captions
given the image with a VLM (Qwen2-VL); the filter here is the text-only analogue, scoring the
whole document from its first token (after an EOS marker) and truncated to ``max_tokens``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from components.data.lm_scoring import check_tokenizer_matches, document_losses
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, pick_reference
from components.registry import Paper

# A document with no tokens has no perplexity: it ranks below every scored document.
NO_TOKENS_SCORE = -1e30


class PerplexityFilter(ScoringSelector):
    key = "perplexity_filter"
    paper = Paper(title="POINTS: Improving Your Vision-language Model with Affordable Strategies",
                  url="https://arxiv.org/abs/2409.04828", arxiv="2409.04828")
    min_references = 1
    needs_tokenizer = True

    class Params(BudgetParams):
        reference: str | None = Field(
            None, min_length=1, description="name of the `reference` stage that scores; default the first one")
        max_tokens: int = Field(256, ge=1, description="score each document's first max_tokens tokens")
        batch_size: int = Field(16, ge=1, description="documents per forward pass")

    def fit(self, context: SelectionContext) -> None:
        where = f"{context.stage} ({self.key})"
        reference = pick_reference(context, self.params.reference, "perplexity_filter")
        check_tokenizer_matches(reference.model, context.tokenizer, where)
        self._model = reference.model
        self._tokenizer = context.tokenizer
        self._progress = context.progress

    def _losses(self, texts) -> np.ndarray:
        return document_losses(self._model, self._tokenizer, list(texts), max_tokens=self.params.max_tokens,
                               batch_size=self.params.batch_size, progress=self._progress)

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        if not hasattr(self, "_model"):
            raise ValueError(f"{self.key}: call fit() before score()")
        losses = self._losses(docs["text"])
        return np.where(np.isnan(losses), NO_TOKENS_SCORE, -losses)
