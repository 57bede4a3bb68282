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

``slorb_group: k`` adds AST's Sparse Low-Rank Boosting (SLoRB; ``sparse_modeling.SparseLinear``
of the official repository [read]): ``W~ = W * M(W) + S @ P``, where ``P`` (in/k x in) sums each
group of k consecutive inputs and ``S`` (out x in/k) is initialised to the mean (or the sum) of
the weights the first mask prunes in each group, so the pruned weights' information is kept
at rank in/k. ``P`` trains too when ``slorb_trainable_projection`` is set (the reference's
``train.sh``: SLoRB_k 32, init "sum", trainable projection; its dataclass defaults: k 64, init
"mean", fixed projection). The reference deploys the 2:4 weight beside the low-rank term; here
the saved model folds ``S @ P`` into its Linears (the function is exact, the weights are then
dense), and the facts record the sparsity of the N:M part before folding and SLoRB's parameters.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
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
    """``W * M(W)`` with ``M`` the N:M magnitude mask of the current ``W``, plus SLoRB's
    ``S @ P`` when ``slorb_group`` is set."""

    def __init__(self, linear: nn.Linear, pattern: PruneParams, decay: float, slorb_group: int | None = None,
                 slorb_init: str = "mean", trainable_projection: bool = False):
        super().__init__(linear)
        self.weight = linear.weight
        self.pattern, self.decay = pattern, decay
        self.register_buffer("first_mask", self.mask(), persistent=False)
        self.register_parameter("slorb", None)
        self.register_buffer("projection", None)  # a buffer when fixed: no optimizer state, never unfrozen
        if slorb_group:
            groups = self.in_features // slorb_group
            group_sums = torch.zeros(groups, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
            group_sums.view(groups, groups, slorb_group).diagonal(dim1=0, dim2=1).fill_(1)  # row g: inputs of group g
            pruned = (self.weight.detach() * (1 - self.first_mask)).view(self.out_features, groups, slorb_group)
            self.slorb = nn.Parameter(pruned.mean(-1) if slorb_init == "mean" else pruned.sum(-1))
            self.projection = nn.Parameter(group_sums) if trainable_projection else group_sums

    def mask(self) -> torch.Tensor:
        return keep_mask(self.weight.detach().abs(), self.pattern, per_row=True, name="weight").to(self.weight.dtype)

    def sparse_weight(self) -> torch.Tensor:
        return _SparseRefinedSte.apply(self.weight, self.mask(), self.decay)

    def effective_weight(self) -> torch.Tensor:
        sparse = self.sparse_weight()
        return sparse if self.slorb is None else sparse + self.slorb @ self.projection


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

        slorb_group: int | None = Field(None, ge=1, description="AST's SLoRB: a low-rank term over groups of this "
                                        "many consecutive inputs beside the N:M weight (None: off; AST: 16 to 64). "
                                        "The saved model folds it in, so its weights are then dense.")
        slorb_init: Literal["mean", "sum"] = Field("mean", description="SLoRB's start: the mean (or sum) of the "
                                                   "weights the first mask prunes in each group.")
        slorb_trainable_projection: bool = Field(False, description="Train SLoRB's group projection too (AST's "
                                                 "train.sh: true).")

        @model_validator(mode="after")
        def _slorb_settings_need_slorb(self):
            if self.slorb_group is None and (self.slorb_init != "mean" or self.slorb_trainable_projection):
                raise ValueError("slorb_init and slorb_trainable_projection set SLoRB up; set slorb_group too")
            return self

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        pattern, targets = PruneParams(pattern=p.pattern), self.targets(model)
        for name, linear in sorted(targets.items()):
            check_width(pattern, linear.in_features, name)
        if p.slorb_group:
            self.check_groups_divide(targets, p.slorb_group, key="slorb_group")
        self.replace(model, targets, lambda linear: AdaptiveNMLinear(
            linear, pattern, p.decay, p.slorb_group, p.slorb_init, p.slorb_trainable_projection))

    def finalize(self, model: nn.Module) -> dict:
        changed = total = zeros = slorb_params = 0
        for module in self.replaced(model).values():
            keep = module.mask()
            changed += int((keep != module.first_mask).sum())
            zeros += int((module.weight * keep == 0).sum())
            total += module.weight.numel()
            if module.slorb is not None:
                slorb_params += module.slorb.numel() + (module.projection.numel()
                                                        if isinstance(module.projection, nn.Parameter) else 0)
        replaced = self.fold_back(model)
        facts = {"sr_ste_pattern": self.params.pattern, "sr_ste_layers": len(replaced),
                 "mask_changes": changed / total if total else 0.0}
        if self.params.slorb_group:
            facts.update(slorb_group=self.params.slorb_group, slorb_params=slorb_params,
                         sr_ste_sparsity_before_fold=zeros / total if total else 0.0)
        return facts
