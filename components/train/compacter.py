"""Compacter: parameter-efficient fine-tuning with Kronecker-sum (PHM) updates and shared factors.

Compacter (Karimi Mahabadi, Henderson, Ruder; NeurIPS 2021, arXiv 2106.04647; code
``rabeehk/compacter``) builds each weight of its adapters as a parameterized hypercomplex
multiplication (PHM) matrix ``W = sum_i A_i kron B_i`` (i = 1..n): the ``A_i`` (n x n) are shared
by every layer, and each layer's ``B_i`` is low rank, ``s_i t_i`` with ``s_i`` (out/n x r) and
``t_i`` (r x in/n), r = 1 in the paper. A layer then trains ``r * (out + in)`` numbers, a rank-r
LoRA's count, but its update can reach rank ``n * n * r``.

Different from the paper (a stated departure, not a guess): the paper puts the PHM matrices in
bottleneck adapters with a GeLU between them, after the attention and the feed-forward blocks
(Houlsby placement). Here the PHM matrix is the update of each targeted Linear itself,
``W' = W + (alpha / r) * sum_i A_i kron s_i t_i``, where LoRA puts its ``B A``, because a
non-linear adapter cannot be folded back into a plain ``LlamaForCausalLM`` and every artifact of
this project must be one. The Kronecker structure, the shared ``A`` and the low-rank ``B`` are
the paper's. Initialisation: the paper's ``A`` and ``B`` start random (Glorot and normal); here
``s_i`` starts at zero, as LoRA's ``B`` does, so training starts from the pretrained function,
with ``t_i`` Kaiming-uniform and the shared ``A_i`` normal with std ``1/sqrt(n)`` [guess: the
code's ``phm_init_range`` is 0.0001, a scale made for its adapters, not for an update].

Every other parameter is frozen. When training ends the update is folded into each Linear, so
the artifact is a plain Llama that flows into PTQ, merge and evaluate.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from components.registry import Paper
from components.train.method import unwrap
from components.train.replacement import FoldableLinear, LinearReplacement


class CompacterError(ValueError):
    """Compacter params that cannot apply to the model (n not dividing a layer's widths)."""


def kronecker_sum(shared: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_i shared[i] kron (left[i] @ right[i])``: shared (n, n, n), left (n, p, r), right (n, r, q)
    -> (n * p, n * q). Element [a*p + b, c*q + d] is sum_i shared[i, a, c] * B_i[b, d]."""
    n, p, q = shared.shape[0], left.shape[1], right.shape[2]
    low_rank = left @ right  # (n, p, q): each B_i
    return torch.einsum("iac,ibd->abcd", shared, low_rank).reshape(n * p, n * q)


class PhmLinear(FoldableLinear):
    """``y = x (W + scale * sum_i A_i kron s_i t_i)ᵀ + bias``, with ``W`` and ``bias`` frozen and the
    ``A_i`` a parameter shared with every other ``PhmLinear`` of the model."""

    def __init__(self, linear: nn.Linear, shared: nn.Parameter, rank: int, alpha: float):
        super().__init__(linear)
        n = shared.shape[0]
        device, dtype = linear.weight.device, linear.weight.dtype
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.phm_shared = shared  # registered in every layer; parameters() and the optimizer see it once
        self.phm_left = nn.Parameter(torch.zeros(n, self.out_features // n, rank, device=device, dtype=dtype))
        self.phm_right = nn.Parameter(torch.empty(n, rank, self.in_features // n, device=device, dtype=dtype))
        for i in range(n):
            nn.init.kaiming_uniform_(self.phm_right[i], a=math.sqrt(5))

    def update(self) -> torch.Tensor:
        return self.scale * kronecker_sum(self.phm_shared, self.phm_left, self.phm_right)

    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.update().to(self.weight.dtype)


class CompacterFinetune(LinearReplacement):
    key = "compacter"
    paper = Paper(title="Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
                  url="https://arxiv.org/abs/2106.04647", arxiv="2106.04647")

    class Params(LinearReplacement.Params):
        phm_dim: int = Field(4, ge=2, description="n: Kronecker factors per update and the shared A_i's size (the "
                                                  "paper's best: 4); must divide every target's widths")
        rank: int = Field(1, ge=1, description="Rank r of each B_i = s_i t_i (the paper's Compacter: 1)")
        alpha: float = Field(2.0, gt=0, description="The update is scaled by alpha / rank, as LoRA's is")

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        targets = self.targets(model)
        uneven = sorted(name for name, m in targets.items() if m.in_features % p.phm_dim or m.out_features % p.phm_dim)
        if uneven:
            m = targets[uneven[0]]
            raise CompacterError(f"params.phm_dim={p.phm_dim} does not divide the widths of {uneven[0]} "
                                 f"({m.out_features} x {m.in_features})")
        narrow = sorted(name for name, m in targets.items()
                        if p.rank > min(m.in_features, m.out_features) // p.phm_dim)
        if narrow:
            raise CompacterError(f"params.rank={p.rank} is larger than layer {narrow[0]} allows (min(in, out) / "
                                 f"phm_dim)")
        unwrap(model).requires_grad_(False)
        weight = next(iter(targets.values())).weight
        shared = nn.Parameter(torch.randn(p.phm_dim, p.phm_dim, p.phm_dim, device=weight.device,
                                          dtype=weight.dtype) / math.sqrt(p.phm_dim))
        self.replace(model, targets, lambda linear: PhmLinear(linear, shared, p.rank, p.alpha))

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        layer_params = sum(m.phm_left.numel() + m.phm_right.numel() for m in replaced.values())
        shared = next(iter(replaced.values())).phm_shared.numel()
        return {"compacter_phm_dim": self.params.phm_dim, "compacter_rank": self.params.rank,
                "compacter_layers": len(replaced), "compacter_layer_params": layer_params,
                "compacter_shared_params": shared}
