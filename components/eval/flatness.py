"""Flatness of a trained model: the trace of the loss Hessian, by Hutchinson's estimator.

``Tr(H) = E[v^T H v]`` for Rademacher ``v`` (entries +-1), and ``H v`` is one Hessian-vector
product (double backward through the gradient), so the trace costs ``probes`` HVPs and no
Hessian. The loss is the mean causal-LM loss over fixed test blocks, so every model of an
evaluate stage is measured on the same data. Reported: the trace over all trainable parameters,
its standard error over the probes, and the trace per parameter (comparable across model sizes).

The probes are drawn from a generator seeded with ``seed``, so a model's estimate is
reproducible. SDPA's fused CPU kernel has no double backward, so the HVPs run with eager
attention (the model's own attention is restored afterwards).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from components.train.acceleration import attention_implementation


def hessian_trace(model: nn.Module, blocks: torch.Tensor, probes: int, seed: int = 0) -> dict[str, float]:
    """Hutchinson's estimate of the loss Hessian's trace at ``model`` on ``blocks`` (token ids,
    [n, seq]); ``probes`` Rademacher vectors."""
    if probes < 2:
        raise ValueError(f"hessian_trace needs at least 2 probes for a standard error, got probes={probes}")
    if blocks.numel() == 0:
        raise ValueError("hessian_trace needs at least one test block")
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    with attention_implementation([model], "eager"):
        loss = model(input_ids=blocks, labels=blocks).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        samples = []
        for i in range(probes):
            vs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i < probes - 1)
            samples.append(float(sum((v * h).sum() for v, h in zip(vs, hvs))))
    mean = sum(samples) / probes
    se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (probes - 1) / probes)
    n_params = sum(p.numel() for p in params)
    return {"hessian_trace": mean, "hessian_trace_se": se, "hessian_trace_per_param": mean / n_params,
            "hessian_probes": float(probes)}
