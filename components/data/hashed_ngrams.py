"""Hashed word n-gram count features, the shared featurizer of the n-gram selectors.

Words follow NLTK's ``wordpunct_tokenize`` pattern (runs of word characters, or runs of other
non-space characters) on lower-cased text, as in DSIR's default featurizer. Each unigram and
bigram is hashed into ``num_buckets`` with CRC32, which is stable across processes (Python's
``hash`` is salted per process, so features would change from run to run).

The whole batch is hashed at once: words of all texts go into one flat array, bigrams are formed
between neighbours and the pairs that straddle two texts are dropped, so numpy runs a few calls
per batch instead of per text. Each distinct word is CRC32-hashed once per call.
"""
from __future__ import annotations

import itertools
import re
import zlib
from typing import Sequence

import numpy as np
import scipy.sparse as sp

WORDPUNCT = re.compile(r"\w+|[^\w\s]+")
_BIGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: mixes the pair's hashes


def wordpunct_words(text: str) -> list[str]:
    return WORDPUNCT.findall(text.lower())


def hashed_ngram_counts(texts: Sequence[str], num_buckets: int = 10_000, ngram_orders: Sequence[int] = (1, 2),
                        dtype=np.float32) -> sp.csr_matrix:
    """Counts of hashed word n-grams per text: a CSR matrix of shape (len(texts), num_buckets).

    Row ``i`` sums to ``n_i`` (if 1 in ``ngram_orders``) plus ``n_i - 1`` (if 2 in it, and
    ``n_i > 1``), where ``n_i`` is the number of words of text ``i``; a text without words is an
    empty row.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if not set(ngram_orders) <= {1, 2} or not ngram_orders:
        raise ValueError(f"ngram_orders must be a non-empty subset of (1, 2), got {tuple(ngram_orders)}")
    findall = WORDPUNCT.findall
    words: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for row, text in enumerate(texts):
        found = findall(text.lower())
        lengths[row] = len(found)
        words.extend(found)
    # Hash each distinct word once. `setdefault` with a running counter (all in C, no Python
    # frame per word) gives every word the position of its first occurrence as its index.
    first: dict[str, int] = {}
    index = np.fromiter(map(first.setdefault, words, itertools.count()), dtype=np.int64, count=len(words))
    table = np.zeros(len(words), dtype=np.uint64)
    table[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = np.fromiter(
        map(zlib.crc32, map(str.encode, first)), dtype=np.uint64, count=len(first))
    hashes = table[index]
    row_of_word = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    buckets = np.uint64(num_buckets)
    rows, cols = [], []
    if 1 in ngram_orders:
        rows.append(row_of_word)
        cols.append((hashes % buckets).astype(np.int64))
    if 2 in ngram_orders and hashes.size > 1:
        same_text = row_of_word[:-1] == row_of_word[1:]  # neighbours in the flat array, same text
        with np.errstate(over="ignore"):  # wrap-around multiplication is the point
            pair = (hashes[:-1][same_text] * _BIGRAM_MIX) ^ (hashes[1:][same_text] + np.uint64(1))
        rows.append(row_of_word[:-1][same_text])
        cols.append((pair % buckets).astype(np.int64))
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    matrix = sp.coo_matrix((np.ones(r.size, dtype=dtype), (r, c)), shape=(len(texts), num_buckets))
    return matrix.tocsr()  # sums duplicate (row, bucket) pairs
