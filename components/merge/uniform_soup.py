"""Uniform (or weighted) model soup: the average of fine-tuned checkpoints' weights."""
from __future__ import annotations

import torch

from components.merge.base import Merger, ScoreFn, StateDict, merge_weights
from components.registry import Paper

SOUP_PAPER = Paper(
    title="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
          "without increasing inference time",
    url="https://arxiv.org/abs/2203.05482",
    arxiv="2203.05482",
)


class UniformSoup(Merger):
    """theta = sum_i w_i theta_i with w normalized to sum 1 (default: uniform 1/n).

    ``base`` is only used for the compatibility check; non-float tensors come from the first model.
    """

    key = "uniform_soup"
    paper = SOUP_PAPER
    requires_base = False

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        weights = self.resolve_weights(len(models), default=1.0, normalize=True)

        def weighted_sum(key: str, first: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
            acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for w, theta in zip(weights, thetas):
                acc += w * theta
            return acc

        return merge_weights(models[0], models, weighted_sum)
