"""HALO: Hadamard-assisted lower-precision training (Ashkboos et al. 2025, arXiv 2501.02625).

Every targeted block projection runs its three GEMMs (forward ``y = x W^T``, input gradient
``dX = e W``, weight gradient ``dW = e^T x``) on fake-quantized operands with one absmax scale
per tensor, as HALO's kernels do; ``level`` chooses the Hadamard rotations around them, following
the official repository (IST-DASLab/HALO, ``qllmt/nn/halo*_fns.py``) [read]:

- level 0 (``HaloFnLevel0``): no rotation; ``y = Q(x) Q(W)^T``, ``dX = Q(e) Q(W)``,
  ``dW = Q(e)^T Q(x)``.
- level 1 (``HaloFnLevel1``): the forward GEMM on ``Q(xH) Q(WH)^T`` (H along the input
  dimension, so the rotations cancel); the backward GEMMs as level 0 on the unrotated x and W.
- level 2 (``HaloFnLevel2WithQFSDPBackwardXH``, the form whose weight gradient also uses the
  rotated input): the forward as level 1; ``dX`` from ``Q(H_t e)`` (a left Hadamard over the
  tokens, undone after the GEMM) and the forward's ``Q(WH)``; ``dW = (Q(e)^T Q(xH)) H``.
  The repository's plain ``HaloFnLevel2`` quantizes x unrotated for ``dW``; with per-tensor
  scales that GEMM then sees the outlier channels level 2 is meant to hide, so this is the
  variant implemented.

Rotations are orthonormal block Hadamards (``components/quant/hadamard.py``); a dimension that
is not a power of two (the MLP's 704) uses blocks of its largest power-of-two divisor.

What is emulated and what is not: the grids are the project's PTQ grids (``int<b>`` symmetric
integers, or any minifloat such as ``e4m3``), applied in fp32 on the CPU, so the accuracy effect
of low-precision GEMMs is reproduced and their speed is not (HALO's INT8/FP8 CUDA kernels and
HQ-FSDP are not here). ``gemm_format: fp32`` is the full-precision reference through the same
layer (plain GEMMs), so a recipe compares like with like.

``outlier_channels`` / ``outlier_scale`` make the paper's failure case on a model that has none:
``components/model/outliers.py`` scales a few hidden channels up at the projections' inputs
without changing the model's function. The trained master weights are saved as a plain
``LlamaForCausalLM`` (with those channels still scaled, which computes the same function).
"""
from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from components.model.outliers import inject_outlier_channels
from components.quant.fake_quant import quantize_int
from components.quant.hadamard import rotate
from components.quant.minifloat import from_name, minifloat_fake_quant
from components.registry import Paper
from components.train.replacement import FoldableLinear, LinearReplacement

INT_FORMAT = re.compile(r"int([2-8])")


def gemm_quantizer(gemm_format: str):
    """The per-tensor fake quantizer of a GEMM operand for ``gemm_format`` (None for fp32)."""
    if gemm_format == "fp32":
        return None
    match = INT_FORMAT.fullmatch(gemm_format)
    if match:
        bits = int(match[1])
        return lambda t: quantize_int(t, bits, True, "per_tensor")
    fmt = from_name(gemm_format)
    return lambda t: minifloat_fake_quant(t, fmt, scale_granularity="per_tensor")


class _LowPrecisionGemm(torch.autograd.Function):
    """``x @ weight.T`` (x: [tokens, in]) with all three GEMMs on quantized operands, in fp32."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # emulated GEMMs stay fp32 under bf16 autocast
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, x, weight, quantize, level):
        xf, wf = x.float(), weight.float()
        qx, qw = (quantize(rotate(xf), "input"), quantize(rotate(wf), "weight")) if level else \
            (quantize(xf, "input"), quantize(wf, "weight"))
        # level 1's backward quantizes the unrotated operands; levels 0 and 2 reuse the forward's
        ctx.save_for_backward(*((x, weight) if level == 1 else (qx, qw)))
        ctx.quantize, ctx.level, ctx.dtypes = quantize, level, (x.dtype, weight.dtype)
        return (qx @ qw.T).to(x.dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, grad):
        quantize, level = ctx.quantize, ctx.level
        qx, qw = ctx.saved_tensors
        if level == 1:
            qx, qw = quantize(qx.float(), "input"), quantize(qw.float(), "weight")
        qe = quantize(grad.float(), "output gradient")
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if level == 2:  # H_t (Q(H_t e) Q(WH)) H = e W: both rotations undone
                grad_x = rotate(rotate(quantize(rotate(grad.float(), 0), "output gradient") @ qw, 0))
            else:
                grad_x = qe @ qw
            grad_x = grad_x.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = qe.T @ qx
            grad_w = (rotate(grad_w) if level == 2 else grad_w).to(ctx.dtypes[1])
        return grad_x, grad_w, None, None


class LowPrecisionLinear(FoldableLinear):
    """A Linear whose GEMMs run on ``gemm_format`` operands with HALO's rotations at ``level``."""

    def __init__(self, linear: nn.Linear, name: str, gemm_format: str, level: int):
        super().__init__(linear)
        self.weight = linear.weight
        self.name, self.gemm_format, self.level = name, gemm_format, level
        self._quantize = gemm_quantizer(gemm_format)
        self._checks_result = not INT_FORMAT.fullmatch(gemm_format)

    def effective_weight(self) -> torch.Tensor:
        return self.weight  # the fp32 master weight; only the GEMMs are low precision

    def quantize(self, operand: torch.Tensor, what: str) -> torch.Tensor:
        try:  # an int grid refuses a non-finite absmax itself
            q = self._quantize(operand)
        except ValueError as error:
            raise FloatingPointError(f"{self.name}: the {what} of a {self.gemm_format} GEMM is not finite "
                                     f"({error})") from None
        if self._checks_result and not torch.isfinite(q).all():  # a minifloat passes NaN on
            raise FloatingPointError(f"{self.name}: the {what} of a {self.gemm_format} GEMM is not finite "
                                     "(inf or nan after quantization)")
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantize is None:
            return super().forward(x)
        y = _LowPrecisionGemm.apply(x.reshape(-1, self.in_features), self.weight, self.quantize, self.level)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, gemm_format={self.gemm_format}, level={self.level}"


class HaloTraining(LinearReplacement):
    key = "halo"
    paper = Paper(title="HALO: Hadamard-Assisted Lower-Precision Optimization for LLMs",
                  url="https://arxiv.org/abs/2501.02625", arxiv="2501.02625")

    class Params(LinearReplacement.Params):
        gemm_format: str = Field("int8", description="Operand format of every GEMM: int<2..8> (symmetric, "
                                 "absmax scale per tensor), a minifloat such as e4m3 or e5m2 (absmax-scaled per "
                                 "tensor), or fp32 (the full-precision reference through the same layer).")
        level: int = Field(2, ge=0, le=2, description="HALO level: 0 no rotation, 1 Hadamard around the forward "
                           "GEMM, 2 around all three GEMMs.")
        outlier_channels: int = Field(0, ge=0, description="Hidden channels made outliers (function-preserving) "
                                      "before training; 0: none.")
        outlier_scale: float = Field(1.0, gt=0, description="How many times larger the outlier channels are.")

        @field_validator("gemm_format")
        @classmethod
        def _known_format(cls, value: str) -> str:
            if value != "fp32" and not INT_FORMAT.fullmatch(value):
                try:
                    from_name(value)
                except ValueError as error:
                    raise ValueError(f"gemm_format={value!r} is not fp32, int2..int8 or a minifloat: {error}") from None
            return value

        @model_validator(mode="after")
        def _rotations_need_a_low_precision_format(self):
            if self.gemm_format == "fp32" and self.level:
                raise ValueError(f"level={self.level} rotates the operands of low-precision GEMMs; "
                                 "with gemm_format=fp32 nothing is quantized, so use level 0")
            if self.outlier_channels and self.outlier_scale == 1.0:
                raise ValueError(f"outlier_channels={self.outlier_channels} with outlier_scale=1 changes "
                                 "nothing; set outlier_scale")
            return self

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        self.outliers = (inject_outlier_channels(model, p.outlier_channels, p.outlier_scale, p.seed)
                         if p.outlier_channels else [])
        targets = self.targets(model)
        names = {id(linear): name for name, linear in targets.items()}  # errors name the layer
        self.replace(model, targets, lambda linear: LowPrecisionLinear(linear, names[id(linear)], p.gemm_format, p.level))

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        p = self.params
        return {"gemm_format": p.gemm_format, "halo_level": p.level, "low_precision_layers": len(replaced),
                "outlier_channels": self.outliers, "outlier_scale": p.outlier_scale if self.outliers else None}
