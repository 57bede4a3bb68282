"""Prepacking: prompts of different lengths prefilled (and decoded) side by side, without pad tokens.

Zhao, Israel, Van den Broeck, Grover 2024, "Prepacking: A Simple Method for Fast Prefilling and
Increased Throughput in Large Language Models" (arXiv 2404.09529), reference code
``siyan-zhao/prepacking`` (``processor.py``). As there:

- prompts are bin-packed into rows whose capacity is, by default, the longest prompt;
- a row holds its prompts one after another, position ids restart at 0 for each prompt, and a
  block-diagonal causal mask keeps each prompt from seeing the others, so every prompt's logits
  are those of its own unpadded forward;
- each prompt's next-token logits are read at its last token.

Different: the reference packs with the ``binpacking`` package and unpacks the KV cache into a
padded batch to decode. Here packing is first-fit decreasing, and decoding stays packed: at every
step each row appends one token per prompt it holds, and the 4-D mask lets that token see its own
prompt and its own earlier tokens only. So the cache is never copied, and nothing is padded but the
rows' unequal ends and the slots of prompts that have finished.

The mask is a float additive mask (0 or the dtype's minimum), which transformers passes through
untouched when it is 4-D, and which the eager and SDPA attention both take.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm


class PrepackingError(ValueError):
    """Prompts or settings that cannot be packed."""


def supports_prepacking(model) -> bool:
    """A transformers model takes position ids, a 4-D mask and a KV cache; a wrapper such as EFT's
    (``components/distill/eft.py``), which combines several models' logits, does not."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices whose lengths sum to at most ``capacity``; longest items placed first,
    each into the first bin with room. Within a bin, indices keep the order they were placed in."""
    if capacity < 1:
        raise PrepackingError(f"bin capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise PrepackingError(f"prompt {too_long[0]} has {lengths[too_long[0]]} tokens, more than the bin "
                              f"capacity {capacity}")
    if any(n < 1 for n in lengths):
        raise PrepackingError(f"prompt {min(range(len(lengths)), key=lambda i: lengths[i])} is empty")
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


@dataclass
class PackingStats:
    """What one packed (or padded) generation computed: token slots, and how many held no token."""

    prompts: int = 0
    forwards: int = 0
    prompt_tokens: int = 0
    prefill_slots: int = 0
    decode_tokens: int = 0
    decode_slots: int = 0
    rows: list[int] = field(default_factory=list)  # prompts per packed row

    @property
    def prefill_pad(self) -> int:
        return self.prefill_slots - self.prompt_tokens

    @property
    def decode_pad(self) -> int:
        return self.decode_slots - self.decode_tokens

    def as_dict(self) -> dict[str, float]:
        return {"prompts": self.prompts, "forwards": self.forwards, "prompt_tokens": self.prompt_tokens,
                "prefill_pad": self.prefill_pad, "decode_tokens": self.decode_tokens,
                "decode_pad": self.decode_pad, "packed_rows": len(self.rows),
                "prompts_per_row": self.prompts / max(len(self.rows), 1)}


def _pack(model, prompts: Sequence[Sequence[int]], bin_size: int | None, rows_per_batch: int):
    if not prompts:
        raise PrepackingError("no prompts to pack")
    if rows_per_batch < 1:
        raise PrepackingError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    if not supports_prepacking(model):
        raise PrepackingError(f"prepacking needs a transformers model (position ids, a 4-D mask, a KV cache); "
                              f"got {type(model).__name__}")
    lengths = [len(p) for p in prompts]
    bins = first_fit_decreasing(lengths, bin_size or max(lengths))
    return lengths, bins, PackingStats(prompts=len(prompts), prompt_tokens=sum(lengths), rows=[len(b) for b in bins])


def _group_rows(bins: list[list[int]], lengths: Sequence[int], rows_per_batch: int) -> list[list[list[int]]]:
    """Bins in batches of ``rows_per_batch``, fullest first, so rows of one batch end near each other."""
    order = sorted(bins, key=lambda b: -sum(lengths[i] for i in b))
    return [order[i:i + rows_per_batch] for i in range(0, len(order), rows_per_batch)]


@torch.no_grad()
def prepacked_greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int] | int,
                              eos_token_id: int | Sequence[int] | None = None, bin_size: int | None = None,
                              rows_per_batch: int = 8, should_stop: Callable[[int, list[int]], bool] | None = None,
                              progress: bool = False) -> tuple[list[list[int]], PackingStats]:
    """Greedy continuations of ``prompts`` (token id lists), each up to its own ``max_new_tokens`` and
    stopping after an ``eos_token_id`` (one id or several; kept, as ``generate`` keeps it). Returns
    the new tokens per prompt, in prompt order, and what was computed.

    ``bin_size`` is a row's prompt-token capacity (default: the longest prompt, as in the paper);
    ``rows_per_batch`` rows go through the model together. ``should_stop(prompt_index, new_tokens)``,
    if given, ends a prompt's generation early (stop strings), after the token that triggered it.
    """
    lengths, bins, stats = _pack(model, prompts, bin_size, rows_per_batch)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(b < 1 for b in budgets):
        raise PrepackingError(f"max_new_tokens must be one int >= 1 or one per prompt ({len(prompts)}), got "
                              f"{max_new_tokens!r}")
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(_group_rows(bins, lengths, rows_per_batch), desc="prepacked generate",
                          disable=not progress):
            _generate_batch(model, prompts, budgets, eos, should_stop, batch, outputs, stats)
    finally:
        model.train(was_training)
    return outputs, stats


def _prefill(model, prompts, rows: list[list[int]], stats: PackingStats):
    """One forward over packed ``rows``: each slot's next-token logits [rows, slots, vocab], the KV
    cache, and which slot each of the row's tokens belongs to (-1: padding) [rows, width]."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_rows, slots = len(rows), max(len(r) for r in rows)
    width = max(sum(len(prompts[i]) for i in r) for r in rows)
    ids = torch.zeros(n_rows, width, dtype=torch.long)
    positions = torch.zeros(n_rows, width, dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    last = torch.zeros(n_rows, slots, dtype=torch.long)  # where each slot's prompt ends
    for r, row in enumerate(rows):
        start = 0
        for s, index in enumerate(row):
            n = len(prompts[index])
            ids[r, start:start + n] = torch.as_tensor(list(prompts[index]), dtype=torch.long)
            positions[r, start:start + n] = torch.arange(n)
            segment[r, start:start + n] = s
            last[r, s] = start + n - 1
            start += n
    # A token sees the tokens of its own prompt up to itself. A pad sees itself only, so no row of
    # the softmax is empty.
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)
    out = model(input_ids=ids.to(device), position_ids=positions.to(device),
                attention_mask=_additive(allowed, dtype).to(device), use_cache=True)
    stats.forwards += 1
    stats.prefill_slots += n_rows * width
    logits = out.logits[torch.arange(n_rows)[:, None], last.to(device)]
    return logits, _returned_cache(out), segment


@torch.no_grad()
def prepacked_next_token_logits(model, prompts: Sequence[Sequence[int]], bin_size: int | None = None,
                                rows_per_batch: int = 8) -> tuple[torch.Tensor, PackingStats]:
    """Packed prefill only: each prompt's next-token logits [n_prompts, vocab], in prompt order."""
    lengths, bins, stats = _pack(model, prompts, bin_size, rows_per_batch)
    result: list[torch.Tensor | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for batch in _group_rows(bins, lengths, rows_per_batch):
            logits, _, _ = _prefill(model, prompts, batch, stats)
            for r, row in enumerate(batch):
                for s, index in enumerate(row):
                    result[index] = logits[r, s]
    finally:
        model.train(was_training)
    return torch.stack(result), stats


def _generate_batch(model, prompts, budgets, eos: set[int], should_stop, rows: list[list[int]], outputs,
                    stats: PackingStats) -> None:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_rows, slots = len(rows), max(len(r) for r in rows)
    logits, cache, segment = _prefill(model, prompts, rows, stats)
    occupied = torch.tensor([[s < len(r) for s in range(slots)] for r in rows])
    index_of = [[r[s] if s < len(r) else None for s in range(slots)] for r in rows]
    active = occupied.clone()
    next_pos = torch.tensor([[len(prompts[index_of[r][s]]) if occupied[r, s] else 0 for s in range(slots)]
                             for r in range(n_rows)])
    prefix = segment[:, None, :] == torch.arange(slots)[None, :, None]  # [rows, slots, width]: slot's prompt
    own = torch.eye(slots, dtype=torch.bool)
    cache_name = _cache_keyword(model)
    step = 0
    while True:
        tokens = logits.argmax(-1).cpu()
        for r in range(n_rows):
            for s in range(slots):
                if not active[r, s]:
                    continue
                index = index_of[r][s]
                outputs[index].append(int(tokens[r, s]))
                if (len(outputs[index]) >= budgets[index] or int(tokens[r, s]) in eos
                        or (should_stop is not None and should_stop(index, outputs[index]))):
                    active[r, s] = False
        if not active.any():
            return
        # Decode step: slot s's new token sees its prompt, its own earlier tokens and itself. A
        # finished or empty slot still computes (the cache grows by `slots` per step) but is unread.
        step += 1
        generated = own.repeat(1, step)[None].expand(n_rows, -1, -1)  # [rows, slots, step*slots]
        allowed = torch.cat([prefix, generated], dim=-1)
        allowed[~occupied] = False
        allowed[..., -slots:] |= own  # every slot sees itself, occupied or not
        out = model(input_ids=torch.where(active, tokens, 0).to(device), position_ids=next_pos.to(device),
                    attention_mask=_additive(allowed, dtype).to(device), use_cache=True, **{cache_name: cache})
        stats.forwards += 1
        stats.decode_tokens += int(active.sum())
        stats.decode_slots += n_rows * slots
        next_pos = next_pos + occupied.long()
        logits = out.logits
        cache = _returned_cache(out)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, q, k] booleans -> [rows, 1, q, k] additive mask (0 where allowed)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _cache_keyword(model) -> str:
    """transformers 5 names the KV cache ``cache``; 4.x (which pyproject still allows) ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
