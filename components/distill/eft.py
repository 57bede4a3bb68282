"""Emulated fine-tuning / up-scaling (Mitchell et al. 2023): logit arithmetic at inference.

``log p_EFT(y_t | x) = log p_large_base + beta * (log p_small_ft - log p_small_base)``,
renormalized per token. The small pair's difference is the "fine-tuning behaviour", added to
the large base model's "knowledge". All three models must share the tokenizer.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight.shape[0]
    return int(model.config.vocab_size)


_NO_DECODER_LAYERS = SimpleNamespace(layers=())


class EftModel(nn.Module):
    """A causal LM whose logits are the renormalized EFT log-probabilities (``log_softmax``ed).

    Works with ``components.eval.perplexity.evaluate_perplexity`` and exposes what lm-eval's
    HFLM uses on a model instance: ``config`` (the large base's), ``device``, ``tie_weights``,
    ``model(ids).logits`` and a greedy ``generate`` (no KV cache: every step reruns the three
    models on the whole prefix, which is fine for short answers). Evaluators that look for
    attention side modules in ``model.model.layers`` (Hedgehog's attention KL) find no layers: the
    ensemble has no attention of its own.
    """

    NAMES = ("large_base", "small_ft", "small_base")

    def __init__(self, large_base: nn.Module, small_ft: nn.Module, small_base: nn.Module, beta: float = 1.0,
                 tokenizers: Sequence | None = None):
        super().__init__()
        models = dict(zip(self.NAMES, (large_base, small_ft, small_base)))
        sizes = {name: _vocab_size(m) for name, m in models.items()}
        if len(set(sizes.values())) != 1:
            odd = [n for n in self.NAMES if sizes[n] != sizes["large_base"]]
            raise ValueError(f"EFT needs one shared vocabulary: vocab sizes {sizes}; {', '.join(odd)} "
                             f"differ from large_base")
        if tokenizers is not None:
            if len(tokenizers) != 3:
                raise ValueError(f"EFT: pass 3 tokenizers (large_base, small_ft, small_base), got {len(tokenizers)}")
            reference = tokenizers[0].get_vocab()
            for name, tokenizer in zip(self.NAMES[1:], tokenizers[1:]):
                vocab = tokenizer.get_vocab()
                if vocab != reference:
                    diff = sorted(set(vocab.items()) ^ set(reference.items()))[:5]
                    raise ValueError(f"EFT: the tokenizer of {name} differs from large_base's "
                                     f"(e.g. {diff}); logit arithmetic needs identical token ids")
        self.large_base, self.small_ft, self.small_base = large_base, small_ft, small_base
        self.beta = float(beta)
        self.config = large_base.config

    @property
    def device(self) -> torch.device:
        return next(self.large_base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.large_base.parameters()).dtype

    @property
    def model(self) -> SimpleNamespace:
        """HF's decoder slot, with no layers (see the class docstring)."""
        return _NO_DECODER_LAYERS

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to tie: the wrapped models are complete (HFLM calls this)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_ignored) -> CausalLMOutput:
        position_ids = None
        if attention_mask is not None:  # left padding (generation): positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        def log_probs(model):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return F.log_softmax(out.logits.float(), dim=-1)

        combined = log_probs(self.large_base)
        if self.beta != 0:
            combined = combined + self.beta * (log_probs(self.small_ft) - log_probs(self.small_base))
        return CausalLMOutput(logits=F.log_softmax(combined, dim=-1))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, stopping_criteria=None,
                 pad_token_id: int | None = None, eos_token_id: int | None = None, do_sample: bool = False,
                 **_ignored) -> torch.Tensor:
        """Greedy decoding; returns prompt + new tokens like ``GenerationMixin.generate``.

        Stops at ``max_length`` total / ``max_new_tokens`` new tokens, when every row hit
        ``eos_token_id``, or when ``stopping_criteria(ids, scores)`` says so for every row.
        Finished rows are padded with ``pad_token_id`` (or eos). Sampling is not supported.
        """
        if do_sample:
            raise NotImplementedError("EftModel.generate is greedy only (do_sample=False)")
        if max_new_tokens is None:
            if max_length is None:
                raise ValueError("EftModel.generate needs max_length or max_new_tokens")
            max_new_tokens = max_length - input_ids.shape[1]
        ids = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        fill = pad_token_id if pad_token_id is not None else eos_token_id
        for _ in range(max(0, max_new_tokens)):
            scores = self(input_ids=ids, attention_mask=mask).logits[:, -1]
            token = scores.argmax(-1)
            if fill is not None:
                token = torch.where(done, torch.full_like(token, fill), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
            if eos_token_id is not None:
                done |= token == eos_token_id
            if stopping_criteria is not None:
                stop = stopping_criteria(ids, scores)
                done |= stop if isinstance(stop, torch.Tensor) else torch.full_like(done, bool(stop))
            if bool(done.all()):
                break
        return ids
