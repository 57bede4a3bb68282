"""bert2BERT: grow a trained small model into a larger preset, then keep training the large one.

The growth itself (FPI and AKI width growth, stacked or interpolated depth) is
``components.model.growth``; this method applies it to the stage's input model before the
optimizer exists, so the trainer trains (and the artifact saves) the grown model.
"""
from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from components.model.growth import SIZE_KEYS, DepthMap, GrowthInit, LlamaSizes, grow_llama, swap_into
from components.model.presets import PRESETS
from components.registry import Paper
from components.train.method import TrainingMethod

class Bert2Bert(TrainingMethod):
    key = "bert2bert"
    paper = Paper(title="bert2BERT: Towards Reusable Pretrained Language Models",
                  url="https://arxiv.org/abs/2110.07143", arxiv="2110.07143")
    # the multi-rank launcher saves rank 0's weights into a model of the input's shape
    one_process_only = "grows the model inside the training process, so the launcher's model has the wrong shape"

    class Params(TrainingMethod.Params):
        grow_to: str = Field(description="The model preset to grow into (see components/model/presets.py).")
        init: GrowthInit = Field("aki", description="fpi: copies keep the function; aki: new units also take "
                                                    "weights from the layer above.")
        depth: DepthMap = Field("stack", description="stack: repeat the layer sequence; interpolate: repeat "
                                                        "each layer in place.")

        @field_validator("grow_to")
        @classmethod
        def _known_preset(cls, value: str) -> str:
            if value not in PRESETS:
                raise ValueError(f"grow_to {value!r} is not a model preset; known presets: {', '.join(PRESETS)}")
            return value

    def __init__(self, params=None):
        super().__init__(params)
        self._grown_from: dict[str, int] = {}

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        self._grown_from = LlamaSizes.of(model.config).as_dict()
        target = {name: PRESETS[p.grow_to][name] for name in SIZE_KEYS}
        try:
            grown = grow_llama(model, **target, init=p.init, depth=p.depth,
                               generator=torch.Generator().manual_seed(p.seed))
        except ValueError as error:
            raise ValueError(f"params.grow_to={p.grow_to!r}: {error}") from None
        swap_into(model, grown)  # the trainer holds `model`: it becomes the grown model

    def finalize(self, model: nn.Module) -> dict:
        return {"grown_from": self._grown_from, "growth_init": self.params.init, "growth_depth": self.params.depth}
