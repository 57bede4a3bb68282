"""Floating-point quantization training (Sun et al., "Scaling Laws for Floating-Point Quantization
Training", ICML 2025, arXiv 2501.02423).

The paper trains Llama models with chosen GEMM inputs fake-quantized to a floating-point format
of ``exp_bits`` exponent and ``man_bits`` mantissa bits, each block of ``block_size`` elements
scaled by ``max_value / absmax`` (its eq. 7), and fits how the loss grows with fewer exponent
bits, fewer mantissa bits and larger blocks. From the paper (v3) [read]:
- the format is IEEE-like with subnormals and round-to-nearest, with no inf or NaN codes (the
  special patterns are ordinary values), simulated with QPyTorch: here the project's minifloat
  emulator with ``nan_encoding="none"``, saturating;
- the six GEMM inputs of a linear layer are P1 = x and P2 = W (forward), P3 = dY and P4 = W (input
  gradient), P5 = dY and P6 = x (weight gradient); the paper's law quantizes P2, P4 and P6, the
  default here;
- only the linear layers are quantized (not attention's dot products, not the classifier): the
  decoder blocks' projections here;
- the scale is shared "every B elements along the channel dimension": here along each operand's
  last dimension (the input features of x and W, the output features of dY).
What differs: the paper multiplies dequantized operands in BF16 and accumulates in FP32; here the
GEMMs run in fp32. The layer is HALO's low-precision GEMM at level 0 (no rotation,
``components/train/halo.py``), so one emulation serves both papers.

The artifact's facts carry ``format_exp_bits``, ``format_man_bits``, ``format_bits`` and
``format_block_size``, which the evaluate stage copies into each model's metrics, so a scaling fit
(``fp_format`` law in ``components/eval/scaling_fit.py``) names them as its variables.
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from torch import nn

from components.quant.minifloat import MinifloatFormat
from components.registry import Paper
from components.train.halo import LowPrecisionLinear, Operand, checked_operands, operand_widths
from components.train.replacement import LinearReplacement


class FloatingPointTraining(LinearReplacement):
    key = "fp_training"
    paper = Paper(title="Scaling Laws for Floating-Point Quantization Training",
                  url="https://arxiv.org/abs/2501.02423", arxiv="2501.02423")

    class Params(LinearReplacement.Params):
        exp_bits: int = Field(ge=1, le=8, description="Exponent bits of the format (bias 2^(exp_bits-1) - 1).")
        man_bits: int = Field(ge=0, le=7, description="Mantissa bits of the format.")
        bits: int | None = Field(None, description="Total bits, sign included; when given, must equal "
                                 "1 + exp_bits + man_bits (a check on the split).")
        block_size: int | None = Field(None, gt=1, description="Elements along an operand's last dimension that "
                                       "share one absmax scale; none: one scale per tensor.")
        operands: tuple[Operand, ...] = Field(("P2", "P4", "P6"), min_length=1, description="GEMM inputs "
                                              "quantized: P1 x, P2 W (forward); P3 dY, P4 W (input gradient); P5 dY, "
                                              "P6 x (weight gradient). The paper's law quantizes P2, P4, P6.")

        _each_operand_once = field_validator("operands")(checked_operands)

        @model_validator(mode="after")
        def _split_fits_the_width(self):
            if self.bits is not None and self.bits != 1 + self.exp_bits + self.man_bits:
                raise ValueError(f"exp_bits={self.exp_bits} + man_bits={self.man_bits} + 1 sign bit = "
                                 f"{1 + self.exp_bits + self.man_bits} bits, which does not fit bits={self.bits}")
            return self

    def format(self) -> MinifloatFormat:
        p = self.params
        return MinifloatFormat(p.exp_bits, p.man_bits, nan_encoding="none", saturate=True)  # named eXmY

    def prepare(self, model: nn.Module) -> None:
        p, fmt = self.params, self.format()
        targets = self.targets(model)
        if p.block_size:
            self.check_groups_divide(targets, p.block_size, "block_size", operand_widths(p.operands))
        names = {id(linear): name for name, linear in targets.items()}  # errors name the layer
        self.replace(model, targets, lambda linear: LowPrecisionLinear(
            linear, names[id(linear)], fmt, level=0, operands=p.operands, block_size=p.block_size))

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        p = self.params
        return {"format": self.format().name, "format_exp_bits": p.exp_bits,
                "format_man_bits": p.man_bits, "format_bits": 1 + p.exp_bits + p.man_bits,
                "format_block_size": p.block_size, "quantized_operands": list(p.operands),
                "low_precision_layers": len(replaced)}
