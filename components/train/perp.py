"""PERP: retrain a pruned model through a handful of parameters that keep its sparsity.

PERP (Zimmer et al., 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs")
shows that after one-shot pruning, retraining only a tiny subset recovers most of the lost
quality: the normalisation weights (and biases, which Llama has none of) and low-rank adapters.
Plain LoRA would destroy the sparsity when merged (``W + B A`` is dense), so PERP's MaskLoRA
multiplies the update by the pruning mask: ``W' = W + (alpha / rank) (B A) * M`` with
``M = (W != 0)``. The merged weight keeps exactly the pruned model's zeros. Read from the
official code (``ZIB-IOL/PERP``; its ``mask_lora`` variant) through the method notes; the
default rank and the choice to train every norm are ours [guess].

The frozen weight stays under its own name, the mask is a buffer, and ``finalize`` folds each
layer into a plain ``nn.Linear`` holding ``W'`` (see ``replacement.py``). ``lora_then_reprune``
in the recipe (plain LoRA merged, then pruned again to the same sparsity) is the obvious
alternative PERP argues against.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from components.registry import Paper
from components.train.replacement import FoldableLinear, LinearReplacement


class MaskedLoraLinear(FoldableLinear):
    """``W + scale * (B @ A) * (W != 0)`` with ``W`` frozen and ``A``, ``B`` trained."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__(linear)
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.register_buffer("mask", (linear.weight.detach() != 0).to(linear.weight.dtype))
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device,
                                               dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device,
                                               dtype=self.weight.dtype))

    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A) * self.mask


class PerpRetrain(LinearReplacement):
    key = "perp"
    paper = Paper(title="PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs",
                  url="https://arxiv.org/abs/2312.15230", arxiv="2312.15230")

    class Params(LinearReplacement.Params):
        rank: int = Field(8, ge=1, description="Rank of each MaskLoRA update.")
        alpha: float = Field(16.0, gt=0, description="The update is scaled by alpha / rank.")
        train_norms: bool = Field(True, description="Also retrain every RMSNorm weight (PERP's cheapest subset).")

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        targets = self.targets(model)
        if all(bool((m.weight != 0).all()) for m in targets.values()):
            raise ValueError("perp retrains a pruned model, but no targeted layer has a zero weight; prune it first "
                             "(a `prune` stage as this stage's model input)")
        model.requires_grad_(False)
        self.replace(model, targets, lambda linear: MaskedLoraLinear(linear, p.rank, p.alpha))
        for name, param in model.named_parameters():
            is_norm = "norm" in name.rsplit(".", 2)[-2]
            if "lora_" in name or (p.train_norms and is_norm):
                param.requires_grad_(True)

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        return {"perp_rank": self.params.rank, "perp_layers": len(replaced),
                "perp_adapter_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in replaced.values())}
