"""Uniform (or weighted) model soup: the average of fine-tuned checkpoints' weights."""
from __future__ import annotations

import torch

from components.merge.base import Merger, ScoreFn, StateDict
from components.registry import Paper


class UniformSoup(Merger):
    """theta = sum_i w_i theta_i with w normalized to sum 1 (default: uniform 1/n).

    ``base`` is only used for the compatibility check; non-float tensors come from the first model.
    """

    key = "uniform_soup"
    paper = Paper(
        title="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
              "without increasing inference time",
        url="https://arxiv.org/abs/2203.05482",
        arxiv="2203.05482",
    )
    requires_base = False

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        weights = self.resolve_weights(len(models), default=1.0, normalize=True)
        merged: StateDict = {}
        for key, first in models[0].items():
            if not first.is_floating_point():
                merged[key] = first.clone()
                continue
            acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for w, sd in zip(weights, models):
                acc += w * sd[key].to(torch.float64)
            merged[key] = acc.to(first.dtype)
        return merged
