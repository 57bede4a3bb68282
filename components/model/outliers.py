"""Outlier channels injected into a Llama without changing what it computes.

LLMs develop a few hidden channels whose activations are orders of magnitude above the rest; a
per-tensor low-precision grid sized to them leaves the other channels a handful of codes. A
micro model trained here has none, so the low-precision training recipes (HALO's sanity check)
make them: the gain of ``count`` channels of both RMSNorms of every block is multiplied by
``scale`` and the matching input columns of the projections those norms feed (q/k/v, gate/up)
are divided by it. The product is the same, so the model's function does not change (up to
rounding; exact for a power-of-two ``scale``), but the projections now see outlier channels.
"""
from __future__ import annotations

import torch
from torch import nn


def inject_outlier_channels(model: nn.Module, count: int, scale: float, seed: int) -> list[int]:
    """Make ``count`` hidden channels (drawn with ``seed``, the same in every block) ``scale``
    times larger at the inputs of the block projections; returns the channels."""
    model = getattr(model, "module", model)
    hidden = model.config.hidden_size
    if not 0 < count <= hidden:
        raise ValueError(f"outlier_channels={count} must be in [1, hidden_size={hidden}]")
    if not scale > 0:
        raise ValueError(f"outlier_scale={scale} must be positive")
    generator = torch.Generator().manual_seed(seed)
    channels = torch.randperm(hidden, generator=generator)[:count].sort().values
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            feeds = ((layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
                     (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)))
            for norm, projections in feeds:
                norm.weight[channels] *= scale
                for projection in projections:
                    projection.weight[:, channels] /= scale
    return channels.tolist()
