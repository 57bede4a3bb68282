"""Retrieval over the training corpus's token blocks, for retrieval-augmented training and scoring
(InstructRetro, Wang et al. 2023, arXiv 2310.07713; RETRO, Borgeaud et al. 2021, arXiv 2112.04426).

The database is the training blocks. Each entry's key is the block's first ``chunk_tokens``
tokens and its value is the block's first ``neighbour_tokens`` tokens: the matched chunk and
what follows it, RETRO's ``[N, F]``. A query is the first chunk of the block being predicted,
so a neighbour is chosen from text the model has already read, never from what it is scored on.

Different here (lite): RETRO embeds chunks with a frozen BERT; here a key is a TF-IDF vector of
hashed token unigrams and bigrams (a lexical retriever, as BM25), because the micro models are
not trained retrievers and no other encoder is available offline. The search is exact: FAISS's
``IndexFlatIP`` on L2-normalised vectors (cosine). At the corpus sizes here (thousands of
blocks) exact search is cheap; a billion-chunk database would swap in an IVF/PQ index behind
``ChunkIndex.search``.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from components.registry import MethodParams

_BIGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: mixes a pair of token ids


class RetrievalLayout(MethodParams):
    """How neighbours are retrieved and laid out before a block; the training method and the
    evaluator take the same settings."""

    chunk_tokens: int = Field(32, ge=1, description="the query: the first tokens of a block; the tokens after "
                                                   "them are the ones predicted with neighbours")
    neighbours: int = Field(2, ge=1, le=16, description="neighbours retrieved per block (RETRO's k)")
    neighbour_tokens: int = Field(64, ge=1, description="tokens of each neighbour put before the block: its "
                                                       "matching chunk and what follows it")
    dims: int = Field(4096, ge=16, description="hashed feature dimensions of the retrieval keys")

    @model_validator(mode="after")
    def _neighbour_holds_its_chunk(self):
        if self.neighbour_tokens < self.chunk_tokens:
            raise ValueError(f"neighbour_tokens ({self.neighbour_tokens}) must hold at least the matched chunk "
                             f"(chunk_tokens {self.chunk_tokens})")
        return self

    def check_matches(self, trained: dict, model: str) -> None:
        """Refuse to score ``model`` in another layout than the one it trained in (``trained``: its
        facts' ``retrieval`` entry), naming the settings that differ."""
        differ = {k: (trained[k], v) for k, v in self.model_dump().items() if k in trained and trained[k] != v}
        if differ:
            was = ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
            now = ", ".join(f"{k}={b}" for k, (_, b) in differ.items())
            raise ValueError(f"model {model} trained with retrieval {was} but the evaluate stage's retrieval has "
                             f"{now}; give the evaluate stage the layout the model trained with")

    def check_blocks(self, seq_len: int, where: str) -> None:
        if seq_len <= self.chunk_tokens or seq_len < self.neighbour_tokens:
            raise ValueError(f"{where}: blocks of {seq_len} tokens are too short for chunk_tokens "
                             f"{self.chunk_tokens} (some tokens must follow the query) and neighbour_tokens "
                             f"{self.neighbour_tokens}")


def _features(chunks: np.ndarray, dims: int) -> np.ndarray:
    """Hashed bucket of every token unigram and bigram of each chunk: ``[n, 2 * len - 1]``."""
    ids = chunks.astype(np.uint64)
    unigrams = ids % np.uint64(dims)
    bigrams = ((ids[:, :-1] * _BIGRAM_MIX) ^ ids[:, 1:]) % np.uint64(dims)
    return np.concatenate([unigrams, bigrams], axis=1).astype(np.int64)


class ChunkIndex:
    """Exact cosine search over the keys of a block database (see the module docstring)."""

    def __init__(self, blocks: np.ndarray, layout: RetrievalLayout):
        import faiss

        blocks = np.asarray(blocks)
        if blocks.ndim != 2 or len(blocks) <= layout.neighbours:
            raise ValueError(f"the retrieval database needs more than neighbours={layout.neighbours} blocks; got "
                             f"shape {blocks.shape}")
        layout.check_blocks(blocks.shape[1], "retrieval database")
        self.blocks, self.layout = blocks, layout
        buckets = _features(blocks[:, :layout.chunk_tokens], layout.dims)
        present = np.zeros(layout.dims, dtype=np.int64)  # document frequency of each bucket
        for row in buckets:
            present[np.unique(row)] += 1
        self.idf = np.log((1 + len(blocks)) / (1 + present)).astype(np.float32) + 1.0
        self.index = faiss.IndexFlatIP(layout.dims)
        self.index.add(self.embed(blocks[:, :layout.chunk_tokens]))

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        """L2-normalised TF-IDF vectors (log-scaled counts) of token chunks, float32 ``[n, dims]``."""
        buckets = _features(np.asarray(chunks), self.layout.dims)
        counts = np.zeros((len(buckets), self.layout.dims), dtype=np.float32)
        np.add.at(counts, (np.repeat(np.arange(len(buckets)), buckets.shape[1]), buckets.ravel()), 1.0)
        vectors = np.log1p(counts) * self.idf
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def search(self, queries: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Database rows of the ``neighbours`` nearest keys to each query chunk, nearest first,
        ``[n, neighbours]``. ``exclude[i]`` (a database row, e.g. the query's own block) is never
        returned for query ``i``."""
        return self._search_vectors(self.embed(queries), exclude)

    def key_neighbours(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``search`` for the database's own keys ``start:stop`` as queries, each excluding its own
        row, from the key vectors the index holds (not embedded again)."""
        stop = len(self.blocks) if stop is None else min(stop, len(self.blocks))
        vectors = self.index.reconstruct_n(start, stop - start)
        return self._search_vectors(vectors, np.arange(start, stop))

    def _search_vectors(self, vectors: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        k = self.layout.neighbours
        found = k + (exclude is not None)
        _, rows = self.index.search(vectors, found)
        if exclude is None:
            return rows.astype(np.int64)
        out = np.empty((len(rows), k), dtype=np.int64)
        for i, (candidates, own) in enumerate(zip(rows, np.asarray(exclude))):
            out[i] = [r for r in candidates if r != own][:k]
        return out

    def values(self, rows: np.ndarray) -> np.ndarray:
        """The neighbours' tokens, concatenated per query: ``[n, neighbours * neighbour_tokens]``."""
        picked = self.blocks[np.asarray(rows).ravel(), :self.layout.neighbour_tokens]
        return np.asarray(picked).reshape(len(rows), -1)


def with_neighbours(blocks: np.ndarray, neighbour_tokens: np.ndarray, chunk_tokens: int) -> tuple[np.ndarray, int]:
    """``[neighbours | block]`` rows and the first position scored: the block's tokens after its
    query chunk (the neighbours and the query are context only)."""
    sequences = np.concatenate([neighbour_tokens, np.asarray(blocks)], axis=1).astype(np.int64)
    return sequences, neighbour_tokens.shape[1] + chunk_tokens
