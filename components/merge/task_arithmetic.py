"""Task arithmetic: add scaled task vectors (fine-tuned minus base weights) to the base."""
from __future__ import annotations

import torch
from pydantic import Field

from components.merge.base import Merger, MergerParams, ScoreFn, StateDict, merge_task_vectors
from components.registry import Paper


class TaskArithmetic(Merger):
    """theta = theta_0 + scaling * sum_i w_i (theta_i - theta_0).

    Follows mergekit's convention: weights default to 1.0 each (a plain sum of task vectors)
    and are only rescaled to sum 1 when ``normalize`` is true. Negative weights are allowed
    (the paper's task negation and analogies), so weights summing to 0 are only an error when
    normalizing. Non-float tensors (integer buffers) are copied from the base.
    """

    key = "task_arithmetic"
    paper = Paper(
        title="Editing Models with Task Arithmetic",
        url="https://arxiv.org/abs/2212.04089",
        arxiv="2212.04089",
    )
    requires_base = True

    class Params(MergerParams):
        scaling: float = Field(1.0, allow_inf_nan=False, description="lambda: multiplies the summed task vectors")
        normalize: bool = Field(False, description="rescale weights to sum 1 before use")

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        weights = self.resolve_weights(len(models), default=1.0, normalize=self.params.normalize)
        scaling = self.params.scaling

        def scaled_sum(key: str, theta0: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
            task_sum = torch.zeros_like(theta0)
            for w, tau in zip(weights, taus):
                task_sum += w * tau
            return scaling * task_sum

        return merge_task_vectors(base, models, scaled_sum)
