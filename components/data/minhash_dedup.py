"""Exact + near-duplicate removal: text hashing, then MinHash signatures with LSH banding.

Near duplicates follow Broder (1997): the Jaccard similarity of two documents' word-n-gram
shingle sets is estimated by the agreement rate of ``num_perm`` min-hashes; LSH banding
(``bands`` x ``rows``) proposes candidate pairs, which are verified against ``threshold``.
Duplicate clusters are joined with union-find and the first document of each is kept, as in
Lee et al. (2021). All hashing is numpy-vectorized and seeded, so results are deterministic.
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from tqdm import tqdm

from components.data.selector import Selector
from components.registry import MethodParams, Paper

_MERSENNE_61 = np.uint64((1 << 61) - 1)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for combining word hashes
_SHINGLES_PER_BLOCK = 32_768  # bounds the (num_perm x shingles) hash matrix to ~32 MB


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index is the root, so "keep the root" keeps the first document
            self.parent[max(ri, rj)] = min(ri, rj)


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def shingle_hashes(texts: list[str], ngram: int, lowercase: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every word ``ngram``-shingle, concatenated, plus per-text shingle counts.

    A text with fewer than ``ngram`` words yields one shingle of all its words.
    """
    vocabulary: dict[str, int] = {}
    word_hashes: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    ids: list[int] = []
    for t, text in enumerate(texts):
        words = (text.lower() if lowercase else text).split()
        lengths[t] = len(words)
        for word in words:
            index = vocabulary.get(word)
            if index is None:
                index = vocabulary[word] = len(word_hashes)
                word_hashes.append(zlib.crc32(word.encode("utf-8")) + 1)  # +1: never 0, 0 pads
        ids.extend(vocabulary[w] for w in words)
    word_values = np.asarray(word_hashes, dtype=np.uint64)[np.asarray(ids, dtype=np.int64)]
    word_values = np.concatenate([word_values, np.zeros(ngram, dtype=np.uint64)])
    doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    doc_end = doc_start + lengths
    counts = np.maximum(lengths - ngram + 1, 1)
    owner = np.repeat(np.arange(len(texts)), counts)
    starts = doc_start[owner] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    combined = np.zeros(starts.size, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 wrap-around is the intended arithmetic
        for k in range(ngram):
            position = starts + k
            term = np.where(position < doc_end[owner], word_values[position], np.uint64(0))
            combined = combined * _MIX + term
        combined ^= combined >> np.uint64(29)
        combined *= _MIX
        combined ^= combined >> np.uint64(32)
    return combined & np.uint64(0xFFFFFFFF), counts


def minhash_signatures(
    shingles: np.ndarray, counts: np.ndarray, num_perm: int, seed: int, progress: bool = False
) -> np.ndarray:
    """(n_docs, num_perm) min-hashes under universal hashes ``(a*x + b) mod (2^61 - 1)``.

    ``a, b < 2^32`` and ``x < 2^32`` keep ``a*x + b < 2^64``, so uint64 arithmetic is exact.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)[:, None]
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)[:, None]
    signatures = np.empty((counts.size, num_perm), dtype=np.uint64)
    ends = np.cumsum(counts)
    starts = ends - counts
    doc = 0
    with tqdm(total=counts.size, desc="minhash", disable=not progress) as bar:
        while doc < counts.size:
            # Take whole documents until the block is full (at least one document per block).
            last = max(int(np.searchsorted(ends, starts[doc] + _SHINGLES_PER_BLOCK, side="right")), doc + 1)
            block = shingles[starts[doc] : ends[last - 1]]
            hashed = (a * block[None, :] + b) % _MERSENNE_61
            offsets = starts[doc:last] - starts[doc]
            signatures[doc:last] = np.minimum.reduceat(hashed, offsets, axis=1).T
            bar.update(last - doc)
            doc = last
    return signatures


class MinHashDedup(Selector):
    """Removes exact duplicates (normalized-text hash) and near duplicates (MinHash + LSH)."""

    key = "minhash_dedup"
    paper = Paper(
        "On the resemblance and containment of documents (Broder 1997); Deduplicating Training Data "
        "Makes Language Models Better (Lee et al. 2021)",
        url="https://doi.org/10.1109/SEQUEN.1997.666900",
        arxiv="2107.06499",
    )

    class Params(MethodParams):
        num_perm: int = Field(128, ge=8, description="min-hashes per document")
        ngram: int = Field(5, ge=1, description="words per shingle")
        bands: int = Field(16, ge=1, description="LSH bands; candidates share all rows of one band")
        rows: int = Field(8, ge=1, description="signature rows per band")
        threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard needed to call a duplicate")
        lowercase: bool = Field(True, description="shingle lower-cased words")
        max_bucket_pairs: int = Field(64, ge=2, description="buckets larger than this compare to their first doc only")
        seed: int = Field(0, ge=0, description="seed of the hash permutations")
        progress: bool = False

        @model_validator(mode="after")
        def _bands_fit(self):
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
            return self

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        p = self.params
        texts = docs["text"].tolist()
        n = len(texts)
        clusters = _UnionFind(n)

        # Exact duplicates: identical whitespace-normalized text.
        first_with_digest: dict[bytes, int] = {}
        representatives = []
        for i, text in enumerate(texts):
            digest = hashlib.blake2b(normalize_whitespace(text).encode("utf-8"), digest_size=16).digest()
            first = first_with_digest.setdefault(digest, i)
            if first == i:
                representatives.append(i)
            else:
                clusters.union(first, i)
        exact_removed = n - len(representatives)

        # Near duplicates among one representative per exact-duplicate group.
        reps = np.asarray(representatives, dtype=np.int64)
        if reps.size > 1:
            shingles, counts = shingle_hashes([texts[i] for i in reps], p.ngram, p.lowercase)
            signatures = minhash_signatures(shingles, counts, p.num_perm, p.seed, p.progress)
            for pair in self._verified_pairs(signatures):
                clusters.union(int(reps[pair[0]]), int(reps[pair[1]]))

        roots = np.fromiter((clusters.find(i) for i in range(n)), dtype=np.int64, count=n)
        keep = roots == np.arange(n)
        n_removed = int((~keep).sum())
        self.stats = {
            "n_docs": n,
            "n_removed": n_removed,
            "removed_by_rule": {"exact_duplicate": exact_removed, "near_duplicate": n_removed - exact_removed},
            "n_duplicate_clusters": int(np.unique(roots[~keep]).size),
        }
        return keep

    def _verified_pairs(self, signatures: np.ndarray) -> list[tuple[int, int]]:
        p = self.params
        pairs: set[tuple[int, int]] = set()
        weights = np.random.default_rng(p.seed + 1).integers(1, 1 << 63, size=p.rows, dtype=np.uint64) | np.uint64(1)
        for band in range(p.bands):
            rows = signatures[:, band * p.rows : (band + 1) * p.rows]
            with np.errstate(over="ignore"):
                keys = (rows * weights).sum(axis=1)  # band hash; collisions are caught by verification
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            boundaries = np.flatnonzero(np.diff(sorted_keys)) + 1
            for bucket in np.split(order, boundaries):
                if bucket.size < 2:
                    continue
                bucket = np.sort(bucket)
                if bucket.size <= p.max_bucket_pairs:
                    candidates = [(int(x), int(y)) for k, x in enumerate(bucket) for y in bucket[k + 1 :]]
                else:
                    candidates = [(int(bucket[0]), int(y)) for y in bucket[1:]]
                pairs.update(candidates)
        if not pairs:
            return []
        left, right = (np.asarray(side, dtype=np.int64) for side in zip(*sorted(pairs)))
        agreement = (signatures[left] == signatures[right]).mean(axis=1)
        ok = agreement >= p.threshold
        return list(zip(left[ok].tolist(), right[ok].tolist()))
