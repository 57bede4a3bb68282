"""The multi-level V-cycle's way down: coalesce the input model into a smaller one, then train it.

Zou et al. (ICLR 2024, "A Multi-Level Framework for Accelerating Training Transformer Models",
arXiv 2404.07999) train the large model briefly, coalesce it (merge pairs of neighbouring units
and of adjacent layers), train the small model, de-coalesce it back and interpolate it with the
large model's weights from before coalescing, then train the large model on. This method is the
coalesce-and-train step; the way up is the ``vcycle_interpolate`` merge method, and
``params/vcycle.yaml`` chains the stages. The operators are ``components.model.growth``.
"""
from __future__ import annotations

from pydantic import Field
from torch import nn

from components.model.growth import DepthMap, LlamaSizes, coalesce_llama, swap_into
from components.registry import Paper
from components.train.method import TrainingMethod

VCYCLE_PAPER = Paper(title="A Multi-Level Framework for Accelerating Training Transformer Models",
                     url="https://arxiv.org/abs/2404.07999", arxiv="2404.07999")


class VCycleCoalesce(TrainingMethod):
    key = "vcycle_coalesce"
    paper = VCYCLE_PAPER
    one_process_only = "coalesces the model inside the training process, so the launcher's model has the wrong shape"

    class Params(TrainingMethod.Params):
        width_factor: int = Field(2, ge=1, description="Hidden size, heads and MLP units are divided by this.")
        depth_factor: int = Field(2, ge=1, description="The layer count is divided by this.")
        depth: DepthMap = Field("interpolate", description="interpolate: adjacent layers merge (the official "
                                                           "default); stack: layer k merges with k + L/2.")

    def __init__(self, params=None):
        super().__init__(params)
        self._coalesced_from: dict[str, int] = {}

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        self._coalesced_from = LlamaSizes.of(model.config).as_dict()
        try:
            small = coalesce_llama(model, width_factor=p.width_factor, depth_factor=p.depth_factor, depth=p.depth)
        except ValueError as error:
            raise ValueError(f"params.width_factor={p.width_factor}, depth_factor={p.depth_factor}: {error}") from None
        swap_into(model, small)  # the trainer holds `model`: it becomes the coalesced model

    def finalize(self, model: nn.Module) -> dict:
        return {"coalesced_from": self._coalesced_from}
