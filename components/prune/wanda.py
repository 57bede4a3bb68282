"""Wanda (Sun et al. 2023): prune by |W_ij| · ||X_j||₂, compared within each output row.

The input norms come from the Hessian's diagonal: ``H = 2/n XᵀX`` gives ``||X_j||₂ =
sqrt(n/2 · H_jj)``, and the constant factor does not change a row's ranking. No weight update
follows (the paper's point: no reconstruction needed). N:M groups rank the same score. As in
the official repository (locuslab/wanda, ``lib/prune.py``): one comparison group per output
row, and the next layers see the pruned layers' outputs.
"""
from __future__ import annotations

import torch

from components.prune.base import Pruner, keep_mask
from components.registry import Paper


class WandaPruner(Pruner):
    key = "wanda"
    paper = Paper(title="A Simple and Effective Pruning Approach for Large Language Models",
                  url="https://arxiv.org/abs/2306.11695", arxiv="2306.11695")

    def prune_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, name: str) -> torch.Tensor:
        norms = torch.diagonal(hessian).clamp(min=0).sqrt().to(weight.dtype)
        return weight * keep_mask(weight.abs() * norms.unsqueeze(0), self.params, per_row=True, name=name)
