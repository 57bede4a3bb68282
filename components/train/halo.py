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

The same layer serves plain low-precision training (``components/train/fp_training.py``): at
level 0, ``operands`` picks which of the six GEMM inputs are quantized, in Sun et al.'s (arXiv
2501.02423) names: P1 = x and P2 = W of the forward, P3 = the output gradient and P4 = W of the
input-gradient GEMM, P5 = the output gradient and P6 = x of the weight-gradient GEMM (HALO
quantizes all six). ``block_size`` gives every ``block_size`` consecutive elements along an
operand's last dimension their own absmax scale (the input features of x and W, the output
features of a gradient), in place of one scale per tensor.

``outlier_channels`` / ``outlier_scale`` make the paper's failure case on a model that has none:
``components/model/outliers.py`` scales a few hidden channels up at the projections' inputs
without changing the model's function. The trained master weights are saved as a plain
``LlamaForCausalLM`` (with those channels still scaled, which computes the same function).
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from components.model.outliers import inject_outlier_channels
from components.quant.fake_quant import quantize_int
from components.quant.hadamard import rotate
from components.quant.minifloat import MinifloatFormat, from_name, minifloat_fake_quant
from components.registry import Paper
from components.train.replacement import FoldableLinear, LinearReplacement

INT_FORMAT = re.compile(r"int([2-8])")
OPERANDS = ("P1", "P2", "P3", "P4", "P5", "P6")
Operand = Literal[OPERANDS]  # a tuple subscript: one literal per member
OPERAND_NAMES = {"P1": "input", "P2": "weight", "P3": "output gradient (input-gradient GEMM)",
                 "P4": "weight (input-gradient GEMM)", "P5": "output gradient (weight-gradient GEMM)",
                 "P6": "input (weight-gradient GEMM)"}
WIDTH_OF = {"P1": "in", "P2": "in", "P3": "out", "P4": "in", "P5": "out", "P6": "in"}  # each operand's last dim


def gemm_quantizer(gemm_format: str | MinifloatFormat, block_size: int | None = None):
    """The fake quantizer of a GEMM operand for ``gemm_format`` (None for fp32): one absmax scale
    per tensor, or per ``block_size`` elements along the last dimension."""
    if gemm_format == "fp32":
        return None
    match = INT_FORMAT.fullmatch(gemm_format) if isinstance(gemm_format, str) else None
    if match:
        bits = int(match[1])
        if block_size:
            return lambda t: quantize_int(t, bits, True, "group", block_size)
        return lambda t: quantize_int(t, bits, True, "per_tensor")
    fmt = from_name(gemm_format) if isinstance(gemm_format, str) else gemm_format
    if block_size:
        return lambda t: minifloat_fake_quant(t, fmt, block_size)
    return lambda t: minifloat_fake_quant(t, fmt, scale_granularity="per_tensor")


class _LowPrecisionGemm(torch.autograd.Function):
    """``x @ weight.T`` (x: [tokens, in]) with its three GEMMs on the layer's quantized operands, in fp32."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # emulated GEMMs stay fp32 under bf16 autocast
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, x, weight, layer, level):
        xf, wf = x.float(), weight.float()
        qx, qw = (layer.quantize(rotate(xf), "P1"), layer.quantize(rotate(wf), "P2")) if level else \
            (layer.quantize(xf, "P1"), layer.quantize(wf, "P2"))
        # the backward reuses the forward's operands where it quantizes them alike; level 1's
        # backward quantizes the unrotated ones
        ctx.reuse = level != 1 and layer.backward_reuses_forward
        ctx.save_for_backward(*((qx, qw) if ctx.reuse else (x, weight)))
        ctx.layer, ctx.level, ctx.dtypes = layer, level, (x.dtype, weight.dtype)
        return (qx @ qw.T).to(x.dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, grad):
        layer, level = ctx.layer, ctx.level
        qx, qw = ctx.saved_tensors
        if not ctx.reuse:
            qx, qw = layer.quantize(qx.float(), "P6"), layer.quantize(qw.float(), "P4")
        g = grad.float()
        # P3 and P5 are the same tensor: with both quantized alike it is quantized once
        qe = layer.quantize(g, "P3") if level != 2 and layer.same_output_gradients else None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if level == 2:  # H_t (Q(H_t e) Q(WH)) H = e W: both rotations undone
                grad_x = rotate(rotate(layer.quantize(rotate(g, 0), "P3") @ qw, 0))
            else:
                grad_x = (qe if qe is not None else layer.quantize(g, "P3")) @ qw
            grad_x = grad_x.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = (qe if qe is not None else layer.quantize(g, "P5")).T @ qx
            grad_w = (rotate(grad_w) if level == 2 else grad_w).to(ctx.dtypes[1])
        return grad_x, grad_w, None, None


class LowPrecisionLinear(FoldableLinear):
    """A Linear whose GEMMs run on ``gemm_format`` operands (those named in ``operands``) with
    HALO's rotations at ``level``."""

    def __init__(self, linear: nn.Linear, name: str, gemm_format: str | MinifloatFormat, level: int,
                 operands: tuple[str, ...] = OPERANDS, block_size: int | None = None):
        super().__init__(linear)
        if level and frozenset(operands) != frozenset(OPERANDS):
            raise ValueError(f"{name}: HALO level {level} rotates operands it then quantizes, so it quantizes all "
                             f"six; got operands {sorted(operands)}")
        self.weight = linear.weight
        self.name, self.gemm_format, self.level, self.block_size = name, gemm_format, level, block_size
        self.operands = frozenset(operands)
        self._quantize = gemm_quantizer(gemm_format, block_size)
        self._checks_result = not (isinstance(gemm_format, str) and INT_FORMAT.fullmatch(gemm_format))
        self.backward_reuses_forward = (("P1" in self.operands) == ("P6" in self.operands)
                                        and ("P2" in self.operands) == ("P4" in self.operands))
        self.same_output_gradients = ("P3" in self.operands) == ("P5" in self.operands)

    def effective_weight(self) -> torch.Tensor:
        return self.weight  # the fp32 master weight; only the GEMMs are low precision

    def quantize(self, operand: torch.Tensor, which: str) -> torch.Tensor:
        if which not in self.operands:
            return operand
        try:  # an int grid refuses a non-finite absmax itself
            q = self.operand_on_grid(operand, which)
        except ValueError as error:
            raise FloatingPointError(f"{self.name}: the {OPERAND_NAMES[which]} of a {self.label} GEMM is not finite "
                                     f"({error})") from None
        if self._checks_result and not torch.isfinite(q).all():  # a minifloat passes NaN on
            raise FloatingPointError(f"{self.name}: the {OPERAND_NAMES[which]} of a {self.label} GEMM is not finite "
                                     "(inf or nan after quantization)")
        return q

    def operand_on_grid(self, operand: torch.Tensor, which: str) -> torch.Tensor:
        """``operand`` on the layer's grid; a layer whose grid depends on the operand (e.g. dynamic
        fixed point's static exponents) overrides this."""
        return self._quantize(operand)

    @property
    def label(self) -> str:
        fmt = self.gemm_format if isinstance(self.gemm_format, str) else self.gemm_format.name
        return fmt + (f" (blocks of {self.block_size})" if self.block_size else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantize is None:
            return super().forward(x)
        y = _LowPrecisionGemm.apply(x.reshape(-1, self.in_features), self.weight, self, self.level)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, gemm_format={self.label}, level={self.level}, "
                f"operands={','.join(sorted(self.operands))}")


def checked_operands(value: tuple[str, ...]) -> tuple[str, ...]:
    """A params ``operands`` list in ``OPERANDS`` order, refused when it names one twice."""
    if len(set(value)) != len(value):
        raise ValueError(f"operands lists an operand twice: {list(value)}")
    return tuple(sorted(value, key=OPERANDS.index))


def operand_widths(operands) -> list[tuple[str, str]]:
    """The ``sides`` of ``LinearReplacement.check_groups_divide`` for blocks along each operand's last dim."""
    return [(WIDTH_OF[which], f", the last dimension of its {OPERAND_NAMES[which]} ({which})")
            for which in sorted(operands)]


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
