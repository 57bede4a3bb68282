"""Base class of tokenizer trainers, and packing of documents into fixed-length blocks."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from transformers import PreTrainedTokenizerFast

from components.registry import Method


class TokenizerTrainer(Method):
    """Trains a tokenizer on texts and returns it as a ``PreTrainedTokenizerFast``."""

    def train(self, texts: Iterable[str]) -> PreTrainedTokenizerFast:
        raise NotImplementedError(f"{type(self).__name__} must implement train()")


def document_token_counts(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> np.ndarray:
    """Tokens each text takes in packed blocks: its tokens plus the EOS that ``pack_documents``
    appends (token budgets count with this, so a budget is what training will see)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))


def pack_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], seq_len: int) -> np.ndarray:
    """Token ids of every text, each followed by EOS, concatenated and cut into full blocks.

    Returns int32 of shape (n_blocks, seq_len); the incomplete last block is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token; packing needs one to separate documents")
    # The backend batch-encodes in Rust and skips transformers' max-length warnings.
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    pieces = []
    for encoding in encodings:
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if ids.size < seq_len:
        raise ValueError(
            f"only {ids.size} tokens in {len(texts)} documents: fewer than one block of seq_len={seq_len}"
        )
    n_blocks = ids.size // seq_len
    return ids[: n_blocks * seq_len].reshape(n_blocks, seq_len)
