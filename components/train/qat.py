"""Quantization-aware training: block projections compute with fake-quantized weights.

One layer for every low-bit training method. Each targeted Linear is replaced (before the
DeepSpeed engine is built) by a ``FakeQuantLinear`` that keeps the fp32 master weight under the
same name, so checkpoints and optimizer state are those of the plain model, and multiplies by
the weight's quantized value in the forward pass. The backward is the straight-through
estimator of ``components/quant/fake_quant.py``, the grids are the same functions the PTQ methods
use (one set of grids in the project), and scales are statistics of the current weight:
- ``ternary``: absmean scale, codes {-1, 0, 1} (BitNet b1.58; Spectra's TriLM);
- ``binary``: sign times the mean |w| (XNOR-Net);
- ``int``: symmetric min-max grid with ``bits`` bits (RTN's grid).
``granularity`` chooses one scale per tensor (TriLM), per output channel, or per group of
``group_size`` inputs (int only).

When training ends, ``finalize`` folds every layer back into a plain ``nn.Linear`` holding the
quantized weight, so the artifact loads with ``from_pretrained`` and every weight lies on its grid
(tested). ``pack`` then writes, like the quantize stage, ``quantized.safetensors`` with the integer
codes (ternary as 2-bit codes, binary as 1-bit sign codes) and fp32 scales, and their real byte
size in the facts (``quantization.packed_bytes``), which the evaluate stage reports as the model's size.

Spectra's TriLM also changes its schedule: linear decay, the peak learning rate lowered at the
halfway point and weight decay removed at two thirds (section 3.3, read). That is the trainer's
``lr_drop_at``, ``lr_drop_ratio`` and ``weight_decay_off_at``, which any method can use;
``params/trilm.yaml`` sets them.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from components.quant.base import PackedWeights, QuantizationError, QuantizedModel
from components.quant.fake_quant import binarize, quantize_int, ternarize
from components.registry import Paper
from components.train.replacement import FoldableLinear, LinearReplacement

BITS_PER_WEIGHT = {"ternary": math.log2(3), "binary": 1.0}
CODE_BITS = {"ternary": 2, "binary": 1}  # packed code width: {-1, 0, 1} as 2-bit int codes, {-1, 1} as sign bits


class QatPackError(ValueError):
    """A trained weight is not on its format's grid, so it cannot be packed."""


class FakeQuantLinear(FoldableLinear):
    """A Linear whose forward uses ``quantize(weight)``; ``weight`` is the fp32 master copy."""

    def __init__(self, linear: nn.Linear, quantize):
        super().__init__(linear)
        self.weight = linear.weight
        self.quantize = quantize

    def effective_weight(self) -> torch.Tensor:
        return self.quantize(self.weight)


class QuantAwareTraining(LinearReplacement):
    key = "qat"
    quantizes_weights = True
    paper = Paper(title="Spectra: Surprising Effectiveness of Pretraining Ternary Language Models at Scale",
                  url="https://arxiv.org/abs/2407.12327", arxiv="2407.12327")

    class Params(LinearReplacement.Params):
        weight_format: Literal["ternary", "binary", "int"] = Field(
            "ternary", description="ternary (absmean, TriLM), binary (sign x mean|w|) or int (`bits`-bit RTN grid).")
        bits: int = Field(4, ge=2, le=8, description="int: bits per weight code.")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "per_tensor", description="One scale per tensor (TriLM), per output channel, or per group (int only).")
        group_size: int = Field(128, gt=0, description="group: input weights per scale.")

        @model_validator(mode="after")
        def _groups_need_an_int_grid(self):
            if self.granularity == "group" and self.weight_format != "int":
                raise ValueError(f"granularity=group needs weight_format=int; {self.weight_format} weights take one "
                                 "scale per tensor or per output channel")
            return self

    def quantizer(self):
        p = self.params
        if p.weight_format == "int":
            return lambda w: quantize_int(w, p.bits, True, p.granularity, p.group_size)
        dim = None if p.granularity == "per_tensor" else -1  # per output channel: mean over each row
        fn = ternarize if p.weight_format == "ternary" else binarize
        return lambda w: fn(w, dim)

    def bits_per_weight(self) -> float:
        return BITS_PER_WEIGHT.get(self.params.weight_format, float(self.params.bits))

    def prepare(self, model: nn.Module) -> None:
        p, targets = self.params, self.targets(model)
        if p.granularity == "group":
            self.check_groups_divide(targets, p.group_size)
        quantize = self.quantizer()
        self.replace(model, targets, lambda linear: FakeQuantLinear(linear, quantize))

    def pack(self, model: nn.Module) -> QuantizedModel:
        """Integer codes and one fp32 scale per tensor/channel/group for each quantized weight.

        The folded weights are ``code * scale`` already; the scale is recovered as max|w| / qmax
        of each set, so the packed file dequantizes to them within an ulp, and the returned
        ``state_dict`` holds exactly what it dequantizes to (the artifact stores those). Binary
        weights are sign bits and their scales (``PackedWeights.add_sign``), decoded exactly."""
        p = self.params
        store, state = PackedWeights(), {}
        for name, linear in sorted(self.targets(model).items()):
            weight = linear.weight.detach().float()
            try:
                if p.weight_format == "binary":
                    store.add_sign(f"{name}.weight", weight, p.granularity)
                    state[f"{name}.weight"] = weight.clone()  # ±scale exactly: what the sign codes decode to
                else:
                    state[f"{name}.weight"] = store.add_symmetric(
                        f"{name}.weight", weight, CODE_BITS.get(p.weight_format, p.bits), p.granularity,
                        p.group_size, grid=p.weight_format)
            except QuantizationError as e:
                raise QatPackError(str(e)) from None
        bits = max(t["bits"] for t in store.tensors.values())  # binary: 2 where a tensor kept an exact zero
        meta = store.meta("qat", weight_format=p.weight_format, bits=bits, granularity=p.granularity,
                          group_size=p.group_size if p.granularity == "group" else None, symmetric=True)
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        p = self.params
        return {"weight_format": p.weight_format, "bits_per_weight": self.bits_per_weight(),
                "quantized_layers": len(replaced), "weight_granularity": p.granularity}
