"""Per-document scores from a causal LM: mean token loss and mean-pooled hidden states.

Shared by the model-based selectors (perplexity filtering, PreSelect, SnowCoder, GOT-D).
Every document is scored from its first token: the tokenizer's EOS is prepended as a
beginning-of-sequence marker (packing puts EOS between documents, so the model has seen it in
that role), and documents are truncated to ``max_tokens``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from components.data.selector import SelectionError


def check_tokenizer_matches(model, tokenizer, where: str) -> None:
    """A model can only score text tokenized with the tokenizer it was trained on."""
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer is None:
        raise SelectionError(f"{where}: scoring with a model needs the `tokenizer` input")
    if vocab != len(tokenizer):
        raise SelectionError(
            f"{where}: the reference model has a vocabulary of {vocab} tokens but the tokenizer has "
            f"{len(tokenizer)}; the reference model must be trained on the same tokenizer")


def document_token_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> list[np.ndarray]:
    """EOS followed by the first ``max_tokens`` tokens of each text."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SelectionError("the tokenizer has no eos_token, which scoring uses as the first token")
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray([eos] + enc.ids[:max_tokens], dtype=np.int64) for enc in encodings]


def _batches(ids: list[np.ndarray], batch_size: int, pad_id: int, width: int):
    """Length-sorted batches of fixed shape (batch_size, width): (positions in ``ids``, input ids,
    attention mask, real rows). Every batch has the same shape, padded with dummy rows, because
    float results of a matmul depend on its shape: a document's score must not depend on which
    documents share its batch (scores are compared across shards)."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        mask[:, 0] = 1  # dummy rows attend to one token, so no row is fully masked
        for row, i in enumerate(chunk):
            batch[row, : len(ids[i])] = torch.from_numpy(ids[i])
            mask[row, : len(ids[i])] = 1
        yield chunk, batch, mask, len(chunk)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token-id prompts padded on the left, so every row of a
    ``generate`` batch continues from its own last token; the new tokens start at column
    ``input_ids.shape[1]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def document_losses(model, tokenizer, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 16,
                    progress: bool = False) -> np.ndarray:
    """Mean next-token loss (nats/token) of each text; ``exp`` of it is the text's perplexity.

    An empty text (no tokens after EOS) scores NaN.
    """
    ids = document_token_ids(tokenizer, texts, max_tokens)
    out = np.full(len(ids), np.nan)
    model.eval()
    bar = tqdm(total=len(ids), desc="document loss", unit="doc", disable=not progress)
    for chunk, batch, mask, rows in _batches(ids, batch_size, tokenizer.eos_token_id, max_tokens + 1):
        logits = model(input_ids=batch, attention_mask=mask).logits[:rows, :-1].float()
        batch, mask = batch[:rows], mask[:rows]
        targets = batch[:, 1:]
        valid = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        counts = valid.sum(1)
        sums = (nll * valid).sum(1)
        losses = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        out[chunk] = losses.numpy()
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def mean_pooled_states(model, tokenizer, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 16,
                       layer: int = -1, progress: bool = False) -> np.ndarray:
    """Mean over tokens (EOS marker excluded where the text has tokens) of one layer's hidden
    states: an (n_texts, hidden_size) float32 embedding."""
    ids = document_token_ids(tokenizer, texts, max_tokens)
    hidden = model.config.hidden_size
    out = np.zeros((len(ids), hidden), dtype=np.float32)
    model.eval()
    bar = tqdm(total=len(ids), desc="embed", unit="doc", disable=not progress)
    for chunk, batch, mask, rows in _batches(ids, batch_size, tokenizer.eos_token_id, max_tokens + 1):
        states = model(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states[layer][:rows].float()
        mask = mask[:rows]
        weights = mask.clone().float()
        has_text = mask.sum(1) > 1
        weights[has_text, 0] = 0.0  # pool the text's tokens, not the shared EOS marker
        pooled = (states * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        out[chunk] = pooled.numpy()
        bar.update(len(chunk))
    bar.close()
    return out
