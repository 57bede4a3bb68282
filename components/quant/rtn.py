"""Round-to-nearest (RTN) weight-only quantization: the baseline GPTQ compares against.

Each weight group gets one fp16 scale (and, if asymmetric, one zero point) from its range and
every weight is rounded to the nearest grid point independently; no calibration data.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import (PackedWeights, QuantizationError, QuantizedModel, Quantizer, TargetParams,
                                   check_bits, uniform_int_meta)
from components.registry import Paper

FP16_MAX = float(torch.finfo(torch.float16).max)


class RtnQuantizer(Quantizer):
    key = "rtn"
    paper = Paper(
        title="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers "
              "(round-to-nearest baseline)",
        url="https://arxiv.org/abs/2210.17323",
        arxiv="2210.17323",
    )

    class Params(TargetParams):
        bits: Literal[2, 3, 4, 5, 6, 7, 8] = Field(4, description="bits per weight code")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "group", description="one scale per tensor, per output channel (row), or per "
                                 "`group_size` consecutive input weights of a row")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric grid around 0 (no stored zero points)")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        check_bits(self.key, p.bits)
        self.refuse_if_quantized(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store = PackedWeights()
        for module_name, linear in self.target_linears(model):
            name = f"{module_name}.weight"
            weight = linear.weight.detach().to(torch.float32)
            codes, scales, zeros, dequant = quantize_tensor(
                weight, p.bits, p.granularity, p.group_size, p.symmetric, name)
            state[name] = dequant.to(state[name].dtype)
            store.add_int(name, weight.shape, codes, scales, zeros, p.bits, p.granularity, p.group_size,
                          p.symmetric)
        meta = store.meta("rtn", **uniform_int_meta(p))
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)


def quantize_tensor(weight: torch.Tensor, bits: int, granularity: str, group_size: int,
                    symmetric: bool, name: str = "weight"):
    """Round-to-nearest quantization of one 2-D weight.

    Returns ``(codes uint8 [same shape], scales fp16 [rows, groups], zeros uint8 or None,
    dequantized fp32)``; the dequantized values are computed from the fp16 scales actually stored.
    """
    if weight.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if granularity == "per_tensor":
        rows = weight.reshape(1, 1, -1)
    elif granularity == "per_channel":
        rows = weight.reshape(out_features, 1, in_features)
    elif granularity == "group":
        if in_features % group_size:
            raise QuantizationError(
                f"{name}: group_size={group_size} does not divide its input width {in_features}; "
                "choose a group_size that divides every targeted layer's in_features")
        rows = weight.reshape(out_features, in_features // group_size, group_size)
    else:
        raise QuantizationError(f"{name}: unknown granularity {granularity!r}")

    levels = 2**bits - 1
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = rows.abs().amax(dim=-1) / qmax
    else:
        low = rows.amin(dim=-1).clamp(max=0)
        high = rows.amax(dim=-1).clamp(min=0)
        scale = (high - low) / levels
    if not torch.isfinite(scale).all():
        raise QuantizationError(f"{name}: contains non-finite weights; cannot quantize")
    if scale.max() > FP16_MAX:
        raise QuantizationError(f"{name}: weight range too large for fp16 scales (max scale {scale.max():.3g})")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale is exact
    scale16 = scale.to(torch.float16)
    # Round the stored scale up, never down, so no weight falls outside the grid and the
    # rounding error stays within half a step of the stored scale.
    scale16 = torch.where(scale16.to(torch.float32) < scale,
                          torch.nextafter(scale16, torch.full_like(scale16, float("inf"))), scale16)
    step = scale16.to(torch.float32).unsqueeze(-1)

    if symmetric:
        zero = torch.full_like(step, float(2 ** (bits - 1)))
        q = torch.clamp(torch.round(rows / step), -qmax, qmax) + zero
        zeros = None
    else:
        zero = torch.clamp(torch.round(-low.unsqueeze(-1) / step), 0, levels)
        q = torch.clamp(torch.round(rows / step) + zero, 0, levels)
        zeros = zero.squeeze(-1).to(torch.uint8)
    dequant = ((q - zero) * step).reshape(weight.shape)
    codes = q.to(torch.uint8).reshape(weight.shape)
    return codes, scale16, zeros, dequant
