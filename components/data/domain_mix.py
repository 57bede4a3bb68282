"""Domain mixing: sample training documents to a token budget with given per-domain token shares.

The mixing knob of data-recipe studies (Longpre et al. 2023, "A Pretrainer's Guide to Training
Data", arXiv 2305.13169, measure domain composition; mixture ablations in 1.5-Pints, arXiv
2408.03506). Each domain ``d`` gets ``weights[d] * budget_tokens`` tokens: its documents are taken
in a seeded random order, each kept while it still fits the share, then one more if that comes
closer to the share (a domain misses its share by less than one document, and by much less when
its documents are small next to the share), without repetition. Documents of domains not in
``weights`` are left out. Tokens are counted as the select stage counts them: the `tokenizer`
input's tokens + 1 (EOS). The fill rule is ours (the papers do not say).

Weights must be > 0 and sum to 1 (within 1e-6); ``normalize_weights: true`` rescales them
instead. A domain with fewer tokens than its share is an error (no upsampling).
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components.data.selector import DocumentTransform, SelectionContext, SelectionError
from components.data.tokenizer import document_token_counts
from components.registry import MethodParams, Paper


def _fill(order: np.ndarray, tokens: np.ndarray, wanted: float) -> tuple[np.ndarray, int]:
    """Documents from ``order`` whose tokens come as close to ``wanted`` as one pass allows: each
    document in turn if it still fits, then the one that best closes the remaining gap (if closing
    it beats stopping short). Long documents near the end of the budget are skipped rather than
    overshooting by up to a whole document, so the achieved share misses by less than one document."""
    taken = np.zeros(len(order), dtype=bool)
    total = 0
    for k, t in enumerate(tokens[order]):
        if total + t <= wanted:
            taken[k] = True
            total += int(t)
            if total == wanted:
                break
    rest = np.flatnonzero(~taken)
    if total < wanted and rest.size:
        gaps = np.abs(total + tokens[order[rest]] - wanted)
        best = rest[int(np.argmin(gaps))]  # first in the seeded order among equally good
        if gaps.min() < wanted - total:
            taken[best] = True
            total += int(tokens[order[best]])
    return order[taken], total


class DomainMix(DocumentTransform):
    """Keeps a seeded sample of training documents whose token shares per domain match ``weights``."""

    key = "domain_mix"
    paper = Paper("A Pretrainer's Guide to Training Data: Measuring the Effects of Data Age, Domain "
                  "Coverage, Quality, & Toxicity (domain composition)",
                  url="https://arxiv.org/abs/2305.13169", arxiv="2305.13169")
    needs_tokenizer = True

    class Params(MethodParams):
        weights: dict[str, float] = Field(min_length=1, description="token share per domain, e.g. "
                                                                     "{prose: 0.5, code: 0.3, arithmetic: 0.2}")
        budget_tokens: int = Field(ge=1, description="tokens of the mixed training set")
        normalize_weights: bool = Field(False, description="rescale weights to sum to 1 instead of "
                                                           "requiring it")
        seed: int = Field(0, ge=0, description="seeds the document order within each domain")

        @model_validator(mode="after")
        def _positive_weights(self):
            bad = {d: w for d, w in self.weights.items() if not w > 0}
            if bad:
                raise ValueError(f"weights must be > 0; got {bad}")
            total = sum(self.weights.values())
            if not self.normalize_weights and abs(total - 1.0) > 1e-6:
                raise ValueError(f"weights sum to {total:g}, not 1: fix them or set normalize_weights: true")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}

    def transform(self, docs: pd.DataFrame, context: SelectionContext) -> pd.DataFrame:
        p = self.params
        if context.tokenizer is None:
            raise SelectionError(f"{context.stage}: domain_mix needs a `tokenizer` input to count tokens")
        present = sorted(docs["domain"].unique())
        unknown = sorted(set(p.weights) - set(present))
        if unknown:
            raise SelectionError(f"{context.stage}: domain_mix weights name domain(s) {unknown} that are not in "
                                 f"the training docs; present domains: {', '.join(present)}")
        total_weight = sum(p.weights.values())
        tokens = document_token_counts(context.tokenizer, docs["text"])
        domains = docs["domain"].to_numpy()
        keep = np.zeros(len(docs), dtype=bool)
        achieved: dict[str, int] = {}
        for domain, weight in sorted(p.weights.items()):
            rows = np.flatnonzero(domains == domain)
            wanted = weight / total_weight * p.budget_tokens
            available = int(tokens[rows].sum())
            if available < wanted:
                raise SelectionError(
                    f"{context.stage}: domain {domain!r} has {available} tokens in the training docs but the mix asks "
                    f"for {wanted:.0f} ({weight / total_weight:.3g} of budget_tokens={p.budget_tokens}); lower "
                    f"budget_tokens or its weight")
            # crc32: a seed per domain that does not depend on Python's salted str hash
            order = rows[np.random.default_rng([p.seed, zlib.crc32(domain.encode())]).permutation(len(rows))]
            taken, achieved[domain] = _fill(order, tokens, wanted)
            keep[taken] = True
        total = sum(achieved.values())
        self.stats = {"n_docs": len(docs), "n_removed": int((~keep).sum())}
        self.facts = {"mix_tokens": total}
        for domain in sorted(achieved):
            self.facts[f"mix_share_{domain}"] = achieved[domain] / total
            self.facts[f"mix_target_share_{domain}"] = p.weights[domain] / total_weight
            self.facts[f"mix_tokens_{domain}"] = achieved[domain]
        return docs[keep].reset_index(drop=True)
