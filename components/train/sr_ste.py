"""N:M sparse training whose masks keep adapting: SR-STE, as the Adaptive Sparse Trainer uses it.

SR-STE (Zhou et al., ICLR 2021) trains dense master weights ``W`` but computes with
``W * M(W)``, where ``M`` keeps the N largest |w| of every M consecutive inputs of a row and is
recomputed at every forward, so weights can enter and leave the mask. The gradient reaches every
weight (straight through the mask) plus a "sparse-refined" decay on the pruned ones:
``dL/dW = dL/dW~ + decay * (1 - M) * W``, which pushes pruned weights towards zero so the mask
settles. The Adaptive Sparse Trainer (AST; Huang et al., AAAI 2025, ``thu-ml/Adaptive-Sparse-Trainer``)
retrains LLMs to 2:4 this way (``change_mask``, SR-STE decay 1e-4), with distillation from the
dense model on top: that is the distillation method ``ast_kd``
(``components/distill/adaptive_sparse_kd.py``), these layers with logit KD's loss.

When training ends the layers fold into plain Linears holding ``W * M(W)``: exactly N:M sparse.
``mask_changes`` in the facts is the fraction of weights whose mask bit differs between the
first forward and the end: how much the mask adapted.
"""
from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from components.prune.base import PATTERN, PruneParams, check_width, keep_mask
from components.registry import Paper
from components.train.replacement import FoldableLinear, LinearReplacement


class _SparseRefinedSte(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, keep)
        ctx.decay = decay
        return weight * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, keep = ctx.saved_tensors
        return grad + ctx.decay * (1 - keep) * weight, None, None


class AdaptiveNMLinear(FoldableLinear):
    """``W * M(W)`` with ``M`` the N:M magnitude mask of the current ``W``."""

    def __init__(self, linear: nn.Linear, pattern: PruneParams, decay: float):
        super().__init__(linear)
        self.weight = linear.weight
        self.pattern, self.decay = pattern, decay
        self.register_buffer("first_mask", self.mask(), persistent=False)

    def mask(self) -> torch.Tensor:
        return keep_mask(self.weight.detach().abs(), self.pattern, per_row=True, name="weight").to(self.weight.dtype)

    def effective_weight(self) -> torch.Tensor:
        return _SparseRefinedSte.apply(self.weight, self.mask(), self.decay)


class SrSteTraining(LinearReplacement):
    key = "sr_ste"
    paper = Paper(title="Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
                  url="https://arxiv.org/abs/2102.04010", arxiv="2102.04010")

    class Params(LinearReplacement.Params):
        pattern: str = Field("2:4", description="N:M: the N largest |w| of every M consecutive inputs stay.")
        decay: float = Field(1e-4, ge=0, description="Sparse-refined decay on the masked-out weights (AST: 1e-4; "
                             "the SR-STE paper: 2e-4).")

        @field_validator("pattern")
        @classmethod
        def _n_m(cls, pattern: str) -> str:
            match = PATTERN.match(pattern)
            if not match or not 0 < int(match.group(1)) < int(match.group(2)):
                raise ValueError(f"pattern {pattern!r}: SR-STE trains an N:M pattern with 0 < N < M, such as '2:4'")
            return pattern

    def prepare(self, model: nn.Module) -> None:
        pattern, targets = PruneParams(pattern=self.params.pattern), self.targets(model)
        for name, linear in sorted(targets.items()):
            check_width(pattern, linear.in_features, name)
        self.replace(model, targets, lambda linear: AdaptiveNMLinear(linear, pattern, self.params.decay))

    def finalize(self, model: nn.Module) -> dict:
        changed = total = 0
        for module in self.replaced(model).values():
            changed += int((module.mask() != module.first_mask).sum())
            total += module.weight.numel()
        replaced = self.fold_back(model)
        return {"sr_ste_pattern": self.params.pattern, "sr_ste_layers": len(replaced),
                "mask_changes": changed / total if total else 0.0}
