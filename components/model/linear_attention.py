"""Linear attention for the Llama models here: a feature map ``phi`` per attention layer replaces
softmax, ``A_ij = phi(q_i) . phi(k_j) / sum_{j' <= i} phi(q_i) . phi(k_j')``.

Two maps (``FEATURE_MAPS``):
- ``hedgehog`` (Zhang et al. 2024, "The Hedgehog & the Porcupine", arXiv 2402.04347): per head,
  a trainable ``W`` (initialised to the identity) and ``b`` (zeros);
  ``phi(x) = softmax([xW + b, -(xW + b)])`` over the 2d features. Queries and keys have maps of
  their own. The paper writes ``[exp(xW+b), exp(-(xW+b))]``; the softmax over features is the
  overflow-free form the public re-implementations use (flash-linear-attention's
  ``HedgehogFeatureMap``, LoLCATs) [read]. It divides each key's features by their own sum, so it
  is not the same function as the plain exp; we follow the re-implementations.
- ``elu``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020), nothing to train: the paper's
  fixed-map baseline.

The map runs on the queries and keys after RoPE. Two forms of one function:
- linear time (``chunked_causal_linear_attention``): chunks of ``CHUNK`` positions; inside a
  chunk the masked ``C x C`` products, across chunks a running ``sum_j phi(k_j) v_j^T`` and
  ``sum_j phi(k_j)``: O(n C D d) time and no ``n x n`` matrix. Used whenever the mask is plain
  causal (transformers' SDPA mask builder returns no mask then), which is every training step.
- quadratic (the normalised ``n x n`` matrix), for any other mask as HF gives it: padding,
  packed rows, a KV cache while generating; and while distilling, which needs the weights.
Both are tested against the prefix-sum recurrence.

``install_linear_attention`` attaches the maps (``self_attn.feature_map``) and registers the
implementation with transformers' attention interface, so the model's own ``forward``,
``generate`` and every evaluator run it unchanged. With ``distill_attention`` on, each layer
instead runs softmax attention (the teacher's output flows on) and records
``KL(softmax || linear)`` of its rows, with the map's inputs detached: Hedgehog's first stage,
which trains the maps alone to mimic softmax.

A model with linear attention is saved as its plain Llama weights plus the maps' tensors in
``auxiliary.safetensors`` and ``linear_attention`` in its facts; ``tasks.model_io`` installs the
maps again on load (``from_pretrained`` alone would give softmax attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv

from components.model.side_tensors import load_side_tensors

LINEAR_ATTENTION = "paperdag_linear"  # the name registered with transformers' attention interface
# positions per chunk of the linear-time form. On 2 CPU cores (4 heads of 64, forward + backward,
# lengths 128, 512, 2048) 128 took 0.75-0.82x the time of 64; 256 was 3-6% faster than 128 at 128
# and 2048 but 14% slower at 512; 32 was slowest everywhere
CHUNK = 128
FEATURE_MAPS = ("hedgehog", "elu")
MAP_ATTR = "feature_map"


class FeatureMap(nn.Module):
    """phi for the queries and the keys of one attention layer (``heads`` x ``head_dim``)."""

    def __init__(self, kind: str, heads: int, head_dim: int):
        super().__init__()
        if kind not in FEATURE_MAPS:
            raise ValueError(f"feature map {kind!r} is not one of {list(FEATURE_MAPS)}")
        self.kind = kind
        if kind == "hedgehog":
            eye = torch.eye(head_dim).expand(heads, head_dim, head_dim)
            self.query_weight = nn.Parameter(eye.clone())
            self.query_bias = nn.Parameter(torch.zeros(heads, 1, head_dim))
            self.key_weight = nn.Parameter(eye.clone())
            self.key_bias = nn.Parameter(torch.zeros(heads, 1, head_dim))

    def _phi(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu(x) + 1.0
        projected = torch.einsum("bhld,hde->bhle", x, weight.to(x.dtype)) + bias.to(x.dtype)
        return torch.softmax(torch.cat([projected, -projected], dim=-1), dim=-1)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi(query), phi(key)) for ``[batch, heads, length, head_dim]`` inputs."""
        if self.kind == "elu":
            return self._phi(query, None, None), self._phi(key, None, None)
        return (self._phi(query, self.query_weight, self.query_bias),
                self._phi(key, self.key_weight, self.key_bias))


def _allowed(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """Which keys each query may see, from HF's bool or additive mask (0 = visible); causal without one."""
    if attention_mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    mask = attention_mask[..., :k_len]  # as HF's eager attention slices it
    return mask if mask.dtype == torch.bool else mask == 0


def chunked_causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor,
                                    chunk: int = CHUNK) -> torch.Tensor:
    """Causal linear attention in linear time: ``[b, h, n, D]`` features, ``[b, h, n, d]`` values."""
    state = phi_k.new_zeros(*phi_k.shape[:2], phi_k.shape[-1], value.shape[-1])  # sum_j phi(k_j) v_j^T
    norm = phi_k.new_zeros(*phi_k.shape[:2], 1, phi_k.shape[-1])                   # sum_j phi(k_j)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
    outputs = []
    for start in range(0, phi_q.shape[-2], chunk):
        q, k, v = (t[..., start:start + chunk, :] for t in (phi_q, phi_k, value))
        inside = (q @ k.transpose(-1, -2)).masked_fill(~causal[:q.shape[-2], :q.shape[-2]], 0.0)
        numerator = q @ state + inside @ v
        denominator = (q * norm).sum(-1, keepdim=True) + inside.sum(-1, keepdim=True)
        outputs.append(numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny))
        state = state + k.transpose(-1, -2) @ v
        norm = norm + k.sum(-2, keepdim=True)
    return torch.cat(outputs, dim=-2)


def linear_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **_):
    """transformers' attention-interface signature: ``(output [b, l, h, d], weights or None)``."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    feature_map: FeatureMap = getattr(module, MAP_ATTR)
    distill = getattr(module, "distill_attention", False)
    phi_q, phi_k = feature_map(query.detach(), key.detach()) if distill else feature_map(query, key)
    if attention_mask is None and not distill and query.shape[-2] == key.shape[-2]:  # plain causal
        return chunked_causal_linear_attention(phi_q, phi_k, value).transpose(1, 2).contiguous(), None
    allowed = _allowed(attention_mask, query.shape[-2], key.shape[-2], query.device)
    scores = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~allowed, 0.0)
    linear = scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    if not distill:
        return (linear @ value).transpose(1, 2).contiguous(), linear
    logits = (query @ key.transpose(-1, -2) * scaling).float()  # bf16 under autocast: softmax in fp32
    softmax = torch.softmax(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), dim=-1)
    module.attention_kl = attention_kl(softmax.detach(), linear.float(), allowed)
    return (softmax.to(value.dtype) @ value).transpose(1, 2).contiguous(), softmax


def attention_kl(target: torch.Tensor, approx: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of ``KL(target_row || approx_row)``, over the keys a row may see."""
    tiny = torch.finfo(approx.dtype).tiny
    terms = target * (target.clamp_min(tiny).log() - approx.clamp_min(tiny).log())
    return terms.masked_fill(~allowed, 0.0).sum(-1).mean()


ALL_ATTENTION_FUNCTIONS.register(LINEAR_ATTENTION, linear_attention_forward)
# SDPA's mask builder: no mask at all for plain causal attention (the linear-time form), else a bool mask
ALL_MASK_ATTENTION_FUNCTIONS.register(LINEAR_ATTENTION, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def has_linear_attention(model: nn.Module) -> bool:
    return any(hasattr(m, MAP_ATTR) for m in attention_modules(model))


def install_linear_attention(model: nn.Module, kind: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Attach a ``kind`` feature map to every attention layer (loading ``state``, the tensors of
    ``feature_map_state``, when given) and switch the model to linear attention."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for module in attention_modules(model):
        weight = module.q_proj.weight
        setattr(module, MAP_ATTR, FeatureMap(kind, heads, head_dim).to(device=weight.device))
    if state is not None:
        load_side_tensors(model, state, feature_map_state(model), f"linear attention ({kind}): the saved feature maps")
    model.set_attn_implementation(LINEAR_ATTENTION)


def remove_linear_attention(model: nn.Module) -> dict[str, torch.Tensor]:
    """Take the feature maps off and switch back to softmax attention; returns the maps' tensors."""
    state = feature_map_state(model)
    for module in attention_modules(model):
        module.__dict__.pop("distill_attention", None)
        module.__dict__.pop("attention_kl", None)
        if hasattr(module, MAP_ATTR):
            delattr(module, MAP_ATTR)
    model.set_attn_implementation("sdpa")
    return state


def feature_map_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The feature maps' tensors by parameter name (empty for ``elu``)."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if f".{MAP_ATTR}." in name}


def set_distill_attention(model: nn.Module, on: bool) -> None:
    for module in attention_modules(model):
        module.distill_attention = on
        module.attention_kl = None


def recorded_attention_kl(model: nn.Module) -> torch.Tensor:
    """The mean over layers of the KL each layer recorded in its last distilling forward."""
    kls = [m.attention_kl for m in attention_modules(model)]
    if any(kl is None for kl in kls):
        raise RuntimeError("no attention KL recorded: run a forward with set_distill_attention(model, True) first")
    return torch.stack(kls).mean()
