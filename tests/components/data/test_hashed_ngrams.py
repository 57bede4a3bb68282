import zlib

import numpy as np
import pytest
import scipy.sparse as sp

from components.data.hashed_ngrams import hashed_ngram_counts, wordpunct_words

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum!!",
    "347+68=415\n12-5=7",
    "",
    "   \n\t ",
    "single",
    "Ünïcödé wörds, ünïcödé wörds; the quick brown fox",
]


def test_wordpunct_matches_nltk_pattern():
    # NLTK's WordPunctTokenizer: runs of word characters or runs of other non-space characters
    assert wordpunct_words("Hello, world!! It's 3.14") == ["hello", ",", "world", "!!", "it", "'", "s", "3", ".", "14"]
    assert wordpunct_words("  \n ") == []


def test_buckets_are_crc32_golden_values():
    # Frozen bucket ids: a change to the hashing silently changes every fitted DSIR/n-gram model.
    m = hashed_ngram_counts(["Hello, world!! Hello"], 10_000)
    assert m.indices.tolist() == [870, 1069, 1731, 2338, 6878, 7010, 7772, 8753]
    assert m.data.tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    unigrams = hashed_ngram_counts(["Hello, world!! Hello"], 10_000, ngram_orders=(1,))
    assert unigrams.indices.tolist() == sorted(zlib.crc32(w.encode()) % 10_000 for w in ("hello", ",", "world", "!!"))


def test_stable_across_calls_and_batches():
    a = hashed_ngram_counts(TEXTS, 997)
    b = hashed_ngram_counts(TEXTS, 997)
    assert (a != b).nnz == 0
    # a text's row does not depend on the other texts of the batch (no bigram across two texts)
    alone = sp.vstack([hashed_ngram_counts([t], 997) for t in TEXTS]).tocsr()
    assert (a != alone).nnz == 0
    reversed_rows = hashed_ngram_counts(TEXTS[::-1], 997)
    assert (a != reversed_rows[::-1]).nnz == 0


@pytest.mark.parametrize("orders", [(1, 2), (1,), (2,)])
def test_counts_sum_to_unigrams_plus_bigrams(orders):
    m = hashed_ngram_counts(TEXTS, 50, ngram_orders=orders)
    assert m.shape == (len(TEXTS), 50)
    for row, text in enumerate(TEXTS):
        n = len(wordpunct_words(text))
        expected = (n if 1 in orders else 0) + (max(n - 1, 0) if 2 in orders else 0)
        assert m[row].sum() == expected, (row, text)
    assert m.has_canonical_format  # sorted indices, duplicates summed


def test_empty_rows_and_batches():
    m = hashed_ngram_counts(["", "a b", "  "], 10)
    assert m[0].nnz == 0 and m[2].nnz == 0 and m[1].sum() == 3
    assert hashed_ngram_counts([], 10).shape == (0, 10)
    assert hashed_ngram_counts(["", " "], 10).nnz == 0


def test_dtype_and_bad_params():
    assert hashed_ngram_counts(["a"], 5, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="num_buckets must be >= 1"):
        hashed_ngram_counts(["a"], 0)
    with pytest.raises(ValueError, match="ngram_orders"):
        hashed_ngram_counts(["a"], 5, ngram_orders=(3,))
    with pytest.raises(ValueError, match="ngram_orders"):
        hashed_ngram_counts(["a"], 5, ngram_orders=())
