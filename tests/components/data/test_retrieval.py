"""The retrieval database: exact cosine search over block keys, self-exclusion, the layout's checks."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from components.data.retrieval import ChunkIndex, RetrievalLayout, with_neighbours


def database(n: int = 50, seq: int = 16, vocab: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq)).astype(np.int32)


def test_a_query_finds_the_block_whose_key_it_shares_and_exclusion_skips_the_own_block():
    layout = RetrievalLayout(chunk_tokens=6, neighbours=2, neighbour_tokens=10, dims=256)
    blocks = database()
    blocks[7, :6] = blocks[31, :6]  # two blocks with one key
    index = ChunkIndex(blocks, layout)
    rows = index.search(blocks[[31, 12], :6])
    assert rows.shape == (2, 2) and rows[0, 0] in (7, 31) and rows[1, 0] == 12
    assert set(rows[0]) == {7, 31}  # a shared key ties; both come first
    excluded = index.search(blocks[[31, 12], :6], exclude=np.array([31, 12]))
    assert excluded[0, 0] == 7 and 31 not in excluded[0] and 12 not in excluded[1]
    # a query never seen matches by its overlap: half of block 40's key, noise for the rest
    query = blocks[40, :6].copy()
    query[3:] = 499
    assert index.search(query[None])[0, 0] == 40
    values = index.values(excluded)
    assert values.shape == (2, 20) and np.array_equal(values[0, :10], blocks[7, :10])


def test_key_neighbours_are_the_searches_of_the_own_keys_without_embedding_them_again(monkeypatch):
    layout = RetrievalLayout(chunk_tokens=6, neighbours=3, neighbour_tokens=10, dims=256)
    blocks = database()
    blocks[7, :6] = blocks[31, :6]
    index = ChunkIndex(blocks, layout)
    expected = index.search(blocks[:, :6], exclude=np.arange(len(blocks)))
    monkeypatch.setattr(index, "embed", lambda chunks: pytest.fail("the keys were embedded again"))
    assert np.array_equal(np.concatenate([index.key_neighbours(0, 20), index.key_neighbours(20, 99)]), expected)
    assert index.key_neighbours()[31, 0] == 7  # its own row excluded, the block sharing its key first


def test_with_neighbours_puts_the_neighbours_first_and_scores_after_the_query():
    blocks = database(3)
    neighbours = database(3, seq=20, seed=1)
    sequences, first = with_neighbours(blocks, neighbours, chunk_tokens=4)
    assert sequences.shape == (3, 36) and first == 24
    assert np.array_equal(sequences[:, :20], neighbours) and np.array_equal(sequences[:, 20:], blocks)


def test_bad_layouts_and_databases_are_refused_with_the_values():
    with pytest.raises(ValidationError, match="neighbour_tokens \\(4\\) must hold at least the matched chunk"):
        RetrievalLayout(chunk_tokens=8, neighbour_tokens=4)
    with pytest.raises(ValidationError, match="neighbours"):
        RetrievalLayout(neighbours=0)
    with pytest.raises(ValueError, match="more than neighbours=2 blocks"):
        ChunkIndex(database(2), RetrievalLayout(chunk_tokens=4, neighbour_tokens=8))
    with pytest.raises(ValueError, match="blocks of 16 tokens are too short for chunk_tokens 16"):
        ChunkIndex(database(), RetrievalLayout(chunk_tokens=16, neighbour_tokens=16))
