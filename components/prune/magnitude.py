"""Magnitude pruning: drop the weights of smallest |w| in each layer (the baseline of every
pruning paper; Han et al. 2015). Needs no calibration data."""
from __future__ import annotations

import torch

from components.prune.base import PruneParams, Pruner, keep_mask
from components.registry import Paper


class MagnitudePruner(Pruner):
    key = "magnitude"
    paper = Paper(title="Learning both Weights and Connections for Efficient Neural Networks",
                  url="https://arxiv.org/abs/1506.02626", arxiv="1506.02626")
    Params = PruneParams
    needs_calibration = False

    def prune_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, name: str) -> torch.Tensor:
        # layer-wise, as in the Wanda and SparseGPT papers' magnitude baselines
        return weight * keep_mask(weight.abs(), self.params, per_row=False, name=name)
