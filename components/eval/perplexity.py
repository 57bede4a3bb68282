"""Token-weighted perplexity of a causal LM over fixed-length token blocks."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def evaluate_perplexity(model, blocks: np.ndarray, batch_size: int = 8, progress: bool = False) -> dict:
    """Mean next-token NLL over every predicted token of ``blocks`` ([n_blocks, block_len] ids).

    Losses are summed per token and divided once by the token count, so batches and a short
    last batch are weighted exactly by tokens. Returns ``{"loss", "ppl", "tokens"}``.
    """
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a non-empty [n_blocks, block_len>=2] array, got shape {blocks.shape}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"blocks must hold integer token ids, got dtype {blocks.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
                ids = torch.as_tensor(blocks[start:start + batch_size], dtype=torch.long, device=device)
                logits = model(input_ids=ids).logits.to(torch.float32)
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      ids[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    loss = total_nll / total_tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": total_tokens}
