"""SparseGPT (Frantar & Alistarh 2023): prune in GPTQ's column walk, updating the weights not yet
visited to absorb each pruned column's error (Optimal Brain Surgeon).

The walk is ``gptq_solver.obs_walk``, the one GPTQ's grid methods use. Masks are chosen as the
reference does (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``): unstructured, at the start of
each block of ``block_size`` columns, from ``w² / d²`` (``d`` the diagonal of the inverse
Hessian's Cholesky factor) over the block's *current* weights, the lowest fraction of the whole
block; N:M, at every M-th column, the M-N lowest of the next M columns of each row.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from components.prune.base import CalibratedPruneParams, Pruner, check_width
from components.quant.gptq_solver import ColumnRule, obs_walk
from components.registry import Paper


class _MaskRule(ColumnRule):
    def __init__(self, sparsity: float | None, n_m: tuple[int, int] | None):
        self.sparsity, self.n_m = sparsity, n_m
        self.pruned: torch.Tensor | None = None

    def start_block(self, W1: torch.Tensor, d: torch.Tensor) -> None:
        self.pruned = torch.zeros_like(W1, dtype=torch.bool)
        if self.n_m is None:
            scores = (W1 ** 2 / d.unsqueeze(0) ** 2).flatten()
            dropped = int(scores.numel() * self.sparsity)
            if dropped:
                self.pruned.view(-1)[scores.topk(dropped, largest=False).indices] = True

    def column(self, W1: torch.Tensor, i: int, natural: int, d: torch.Tensor) -> torch.Tensor:
        if self.n_m is not None and i % self.n_m[1] == 0:
            n, m = self.n_m
            scores = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
            self.pruned[:, i:i + m].scatter_(1, scores.topk(m - n, dim=1, largest=False).indices, True)
        return W1[:, i].masked_fill(self.pruned[:, i], 0.0)


class SparseGptPruner(Pruner):
    key = "sparsegpt"
    paper = Paper(title="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
                  url="https://arxiv.org/abs/2301.00774", arxiv="2301.00774")

    class Params(CalibratedPruneParams):
        damp: float = Field(0.01, gt=0, description="Hessian damping, a fraction of mean(diag H)")
        block_size: int = Field(128, gt=0, description="columns per mask-selection and lazy-update block")

        @model_validator(mode="after")
        def _blocks_hold_whole_groups(self):
            if self.n_m and self.block_size % self.n_m[1]:
                raise ValueError(f"block_size {self.block_size} must be a multiple of M={self.n_m[1]} "
                                 f"(pattern {self.pattern})")
            return self

    def prune_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, name: str) -> torch.Tensor:
        p = self.params
        rule = _MaskRule(p.sparsity, check_width(p, weight.shape[1], name))
        return obs_walk(weight, hessian, rule, damp=p.damp, block_size=p.block_size, name=name)
