"""Perplexity with retrieved neighbours (InstructRetro-lite, ``components/train/retro.py``).

Each test block's tokens after its query chunk are scored twice, on the same tokens:
- ``none``: the block alone (its query chunk is the context), what a model without retrieval sees;
- ``retrieved``: behind the ``neighbours`` nearest training blocks to its query chunk
  (``components/data/retrieval.py``); test documents are never in the database.

Metrics: ``retrieval_ppl_<format>`` and ``retrieval_loss_<format>`` over all test blocks
(token-weighted), and per domain (``..._<domain>``). How related the retrieved text is, whatever
the model: ``retrieval_overlap`` is the share of the scored tokens' bigrams that occur in the
retrieved neighbours, beside ``retrieval_overlap_random`` for as many random training blocks
(seeded), both averaged over the test blocks.
"""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from components.data.retrieval import ChunkIndex, RetrievalLayout, with_neighbours
from components.eval.infilling import span_scores

FORMATS = ("none", "retrieved")


class RetrievedTestBlocks:
    """Each test block's retrieved neighbours and how related they are: they depend on the data and
    the layout only, so an evaluate stage builds them once and scores every model on them."""

    def __init__(self, layout: RetrievalLayout, blocks_by_domain: dict[str, np.ndarray],
                 train_blocks: dict[str, np.ndarray], max_blocks_per_domain: int | None = None):
        self.layout, self.sources = layout, (blocks_by_domain, train_blocks)
        database = np.concatenate([np.asarray(train_blocks[d]) for d in sorted(train_blocks)])
        index = ChunkIndex(database, layout)
        self.blocks: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        overlaps = {"retrieval_overlap": 0.0, "retrieval_overlap_random": 0.0}  # summed over blocks
        rng = np.random.default_rng(0)
        for domain, blocks in sorted(blocks_by_domain.items()):
            blocks = np.asarray(blocks[:max_blocks_per_domain])
            if len(blocks) == 0:
                continue
            layout.check_blocks(blocks.shape[1], f"retrieval perplexity ({domain} test blocks)")
            self.blocks[domain] = blocks
            self.values[domain] = index.values(index.search(blocks[:, :layout.chunk_tokens]))
            random_rows = rng.integers(0, len(database), size=(len(blocks), layout.neighbours))
            overlaps["retrieval_overlap"] += bigram_overlap(blocks, self.values[domain], layout.chunk_tokens) * len(blocks)
            overlaps["retrieval_overlap_random"] += bigram_overlap(
                blocks, index.values(random_rows), layout.chunk_tokens) * len(blocks)
        scored_blocks = sum(len(b) for b in self.blocks.values())
        self.overlaps = {key: total / scored_blocks for key, total in overlaps.items()} if scored_blocks else {}

    def built_from(self, layout: RetrievalLayout, blocks_by_domain: dict, train_blocks: dict) -> bool:
        """Whether this was built for these very inputs (the same objects), so it can be reused."""
        return layout == self.layout and self.sources[0] is blocks_by_domain and self.sources[1] is train_blocks


def retrieval_metrics(model, layout: RetrievalLayout, blocks_by_domain: dict[str, np.ndarray],
                      train_blocks: dict[str, np.ndarray], batch_size: int = 8,
                      max_blocks_per_domain: int | None = None, progress: bool = False,
                      retrieved: RetrievedTestBlocks | None = None) -> dict[str, float]:
    """The metrics of the module docstring; ``retrieved`` reuses the neighbours built for these
    inputs (and these ``max_blocks_per_domain``) by an earlier call."""
    if retrieved is None:
        retrieved = RetrievedTestBlocks(layout, blocks_by_domain, train_blocks, max_blocks_per_domain)
    out: dict[str, float] = {}
    totals = {f: [0.0, 0] for f in FORMATS}
    for domain, blocks in retrieved.blocks.items():
        built = {"none": (blocks.astype(np.int64), layout.chunk_tokens),
                 "retrieved": with_neighbours(blocks, retrieved.values[domain], layout.chunk_tokens)}
        for f, (sequences, first_scored) in built.items():
            nll = 0.0
            for i in tqdm(range(0, len(sequences), batch_size), desc=f"retrieval ppl ({domain}, {f})",
                          disable=not progress):
                nll += float(span_scores(model, sequences[i:i + batch_size], first_scored)[0].sum())
            count = len(sequences) * (sequences.shape[1] - first_scored)
            out[f"retrieval_loss_{f}_{domain}"] = nll / count
            out[f"retrieval_ppl_{f}_{domain}"] = _ppl(nll / count)
            totals[f][0] += nll
            totals[f][1] += count
    for f, (nll, count) in totals.items():
        if count:
            out[f"retrieval_loss_{f}"] = nll / count
            out[f"retrieval_ppl_{f}"] = _ppl(nll / count)
    out.update(retrieved.overlaps)
    return out


def bigram_overlap(blocks: np.ndarray, neighbour_tokens: np.ndarray, chunk_tokens: int) -> float:
    """Mean share of the distinct token bigrams after each block's query chunk that also occur in
    its neighbours' tokens: how much of what is predicted the neighbours hold (1 for a copy)."""
    shares = []
    for block, neighbours in zip(np.asarray(blocks), np.asarray(neighbour_tokens)):
        predicted = set(zip(block[chunk_tokens:-1].tolist(), block[chunk_tokens + 1:].tolist()))
        held = set(zip(neighbours[:-1].tolist(), neighbours[1:].tolist()))
        shares.append(len(predicted & held) / len(predicted) if predicted else 0.0)
    return float(np.mean(shares))


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
