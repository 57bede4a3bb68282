"""A MosaicBERT-style encoder for masked language modelling (Portes et al., "MosaicBERT: A
Bidirectional Encoder Optimized for Fast Pretraining", NeurIPS 2023, arXiv 2312.17482;
``mosaicml/examples``' ``bert_layers.py``).

A Hugging Face model (``PreTrainedModel``, registered with ``AutoConfig`` and
``AutoModelForMaskedLM`` under ``paperdag_encoder``), so artifacts save and load with
``save_pretrained``/``from_pretrained`` and safetensors, without remote code. What MosaicBERT
changes in BERT, each a setting here so that a recipe can take one away:

- ``position: alibi``: no position embeddings; every head adds ``-m_h * |i - j|`` to its attention
  scores, with MosaicBERT's symmetric (bidirectional) ALiBi and the geometric slopes
  ``m_h = 2^(-8 h / H)`` of Press et al. ``position: learned`` is BERT's table of absolute
  position embeddings; ``none`` has neither (a control that sees no order at all).
- ``glu: true``: the feed-forward is a gated linear unit with GELU (GeGLU), as MosaicBERT's.
- Unpadding: with an ``attention_mask`` holding padding, the projections and feed-forwards run on
  the real tokens only (MosaicBERT's ``unpad_input``/``pad_input`` around its layers); attention
  re-pads them and masks the padding. Packed training blocks have no padding, so there it saves
  nothing; ``unpadded_tokens`` counts what it removed.

Different here: pre-LayerNorm blocks (MosaicBERT keeps BERT's post-LN; pre-LN trains stably at
micro scale without tuning) and PyTorch's SDPA (or the product written out, when the trainer sets
``eager`` attention) instead of FlashAttention's kernels (CPU).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

POSITIONS = ("alibi", "learned", "none")
IGNORE = -100  # HF's ignored label


class EncoderConfig(PretrainedConfig):
    model_type = "paperdag_encoder"

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, intermediate_size: int = 704, max_position_embeddings: int = 512,
                 position: Literal["alibi", "learned", "none"] = "alibi", glu: bool = True,
                 layer_norm_eps: float = 1e-5, initializer_range: float = 0.02, **kwargs):
        if position not in POSITIONS:
            raise ValueError(f"position {position!r}: expected one of {list(POSITIONS)}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_position_embeddings, self.position, self.glu = max_position_embeddings, position, glu
        self.layer_norm_eps, self.initializer_range = layer_norm_eps, initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def alibi_slopes(heads: int) -> torch.Tensor:
    """Press et al.'s head slopes ``2^(-8 h / H)``, h = 1..H (for H a power of two; otherwise the
    paper's interleaving of the next power of two's slopes)."""
    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if math.log2(heads).is_integer():
        return torch.tensor(powers(heads))
    closest = 2 ** math.floor(math.log2(heads))
    return torch.tensor(powers(closest) + powers(2 * closest)[0::2][:heads - closest])


def alibi_bias(heads: int, length: int, device=None) -> torch.Tensor:
    """``[heads, length, length]``: ``-m_h * |i - j|``, symmetric as MosaicBERT's encoder uses it."""
    positions = torch.arange(length, device=device)
    distance = (positions[None, :] - positions[:, None]).abs().float()
    return -alibi_slopes(heads).to(device)[:, None, None] * distance


class EncoderLayer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.heads = config.num_attention_heads
        self.attention_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.o_proj = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.up_proj = nn.Linear(d, 2 * ff if config.glu else ff)
        self.down_proj = nn.Linear(ff, d)
        self.glu = config.glu

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None, shape: tuple[int, int],
                bias: torch.Tensor | None, attention: str = "sdpa") -> torch.Tensor:
        """``tokens``: the real tokens only, ``[n, d]``; ``keep``: their flat positions in the
        ``shape`` batch (None: every position is real, nothing to re-pad); ``bias``: the additive
        attention bias ``[b or 1, heads, L, L]``; ``attention``: ``sdpa`` (PyTorch's fused kernel)
        or ``eager`` (the same product written out)."""
        batch, length = shape
        qkv = self.qkv_proj(self.attention_norm(tokens))  # bf16 under autocast
        if keep is not None:
            padded = qkv.new_zeros(batch * length, qkv.shape[-1])
            padded[keep] = qkv
            qkv = padded
        q, k, v = qkv.view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [3, b, heads, L, d_head]
        bias = None if bias is None else bias.to(q.dtype)
        if attention == "eager":
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (0 if bias is None else bias)
            attended = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        attended = attended.transpose(1, 2).reshape(batch * length, -1)
        if keep is not None:
            attended = attended[keep]
        tokens = tokens + self.o_proj(attended)
        hidden = self.up_proj(self.mlp_norm(tokens))
        if self.glu:
            gate, value = hidden.chunk(2, dim=-1)
            hidden = F.gelu(gate) * value
        else:
            hidden = F.gelu(hidden)
        return tokens + self.down_proj(hidden)


class EncoderStack(nn.Module):
    """Embeddings, layers and the final norm: ``model.layers`` as in a Llama, so the trainer's
    block-Linear helpers (FLOPs, sparse and low-bit methods) find the blocks the same way."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position == "learned" else None)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class EncoderForMaskedLM(PreTrainedModel):
    config_class = EncoderConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.model = EncoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.unpadded_tokens = 0  # padding tokens the layers did not compute, since construction
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_) -> MaskedLMOutput:
        stack, config = self.model, self.config
        batch, length = input_ids.shape
        if stack.embed_positions is not None and length > config.max_position_embeddings:
            raise ValueError(f"a sequence of {length} tokens is longer than the {config.max_position_embeddings} "
                             "learned positions")
        hidden = stack.embed_tokens(input_ids)
        if stack.embed_positions is not None:
            hidden = hidden + stack.embed_positions(torch.arange(length, device=input_ids.device))
        bias = None
        if config.position == "alibi":
            bias = alibi_bias(config.num_attention_heads, length, input_ids.device)[None].to(hidden.dtype)
        keep = None  # packed blocks have no padding: nothing to gather or scatter
        tokens = hidden.reshape(batch * length, -1)
        if attention_mask is not None and not bool(attention_mask.all()):
            real = attention_mask.bool()
            keep = real.flatten().nonzero().squeeze(-1)
            self.unpadded_tokens += batch * length - len(keep)
            pad = torch.zeros(batch, 1, 1, length, dtype=hidden.dtype, device=hidden.device)
            pad.masked_fill_(~real[:, None, None, :], torch.finfo(hidden.dtype).min)  # padded keys: never attended
            bias = pad if bias is None else bias + pad
            tokens = tokens[keep]  # unpadded: the layers see real tokens only
        attention = "eager" if config._attn_implementation == "eager" else "sdpa"  # the trainer's choice
        for layer in stack.layers:
            tokens = layer(tokens, keep, (batch, length), bias, attention)
        logits = self.lm_head(stack.norm(tokens))
        if keep is not None:
            scattered = logits.new_zeros(batch * length, logits.shape[-1])
            scattered[keep] = logits
            logits = scattered
        logits = logits.view(batch, length, -1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE)
        return MaskedLMOutput(loss=loss, logits=logits)


AutoConfig.register(EncoderConfig.model_type, EncoderConfig)
AutoModelForMaskedLM.register(EncoderConfig, EncoderForMaskedLM)
