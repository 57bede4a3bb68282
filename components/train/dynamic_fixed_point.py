"""Integer mixed-precision training with dynamic fixed point (Das et al., "Mixed Precision Training
of Convolutional Neural Networks using Integer Operations", ICLR 2018, arXiv 1802.00930).

Every targeted block projection runs its three GEMMs (forward, input gradient, weight gradient)
on integer operands that share one exponent per tensor: an operand ``t`` becomes
``clamp(round(t * 2^f), -2^(b-1), 2^(b-1) - 1) * 2^-f`` with ``b = bits``, and the binary point
``f`` is recomputed from the operand's current absmax at every use, so the largest magnitude sits
on the top magnitude bit (``components.quant.fake_quant.shared_exponent_frac_bits``). The fp32
master weights take the optimizer's update, as in the paper's mixed-precision scheme.

What was read and what is a guess:
- the paper's abstract [read]: INT16 operands, INT32 accumulation, a shared tensor-wide exponent,
  no hyper-parameter changes against fp32;
- the exponent rule [read, from Intel's DFP16 kernels, not from the paper's text]: libxsmm's
  ``libxsmm_quantize_i16`` takes the tensor's largest exponent and sets ``scf = 14 - (max_exp -
  127)``; here the same rule for any ``bits``;
- the paper's section 3 (its rounding, which tensors it quantizes, its accumulator shifts) was not
  found [guess]: here all six GEMM inputs by default, round to nearest (``rounding: stochastic`` is
  the other option), and the GEMMs accumulate in fp32, which is exact for 8-bit codes in these
  widths and close for 16-bit ones; INT32 overflow handling is therefore not emulated.

``exponent: static`` is the static fixed-point control, the same layer with the exponent frozen:
each operand of each layer keeps the binary point its first use chose (the first batch's forward
and backward), as a fixed-point design calibrated once would.

The layer is HALO's low-precision GEMM at level 0 (``components/train/halo.py``) with this grid in
place of an absmax-scaled one, so one emulation serves HALO, FP quantization training and this.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from components.quant.fake_quant import FRAC_BITS_LIMIT, fixed_point, shared_exponent_frac_bits
from components.registry import Paper
from components.train.halo import OPERANDS, LowPrecisionLinear, Operand, checked_operands
from components.train.replacement import LinearReplacement

UNSET = float(FRAC_BITS_LIMIT + 1)  # a static exponent not chosen yet (a buffer, so a resume keeps the chosen ones)


class DynamicFixedPointLinear(LowPrecisionLinear):
    """A Linear whose GEMM operands are ``bits``-bit integers with one power-of-two scale per tensor."""

    def __init__(self, linear: nn.Linear, name: str, bits: int, operands: tuple[str, ...], static: bool,
                 stochastic: bool):
        super().__init__(linear, name, "fp32", level=0, operands=operands)  # the GEMM plumbing, then our grid
        self.bits, self.static, self.stochastic = bits, static, stochastic
        self.gemm_format = f"{'static' if static else 'dynamic'} fixed point {bits}-bit"
        # non-None sends the forward down the low-precision GEMM; quantize() calls operand_on_grid
        self._quantize = self.operand_on_grid
        self._checks_result = False  # the grid saturates: it never makes an inf
        self.register_buffer("frac_bits", torch.full((len(OPERANDS),), UNSET))

    def operand_on_grid(self, operand: torch.Tensor, which: str) -> torch.Tensor:
        frac_bits = shared_exponent_frac_bits(operand, self.bits)  # refuses a non-finite operand
        if self.static:
            slot = OPERANDS.index(which)
            if float(self.frac_bits[slot]) == UNSET:
                self.frac_bits[slot] = frac_bits
            frac_bits = int(self.frac_bits[slot])
        return fixed_point(operand, self.bits, frac_bits, stochastic=self.stochastic)


class DynamicFixedPointTraining(LinearReplacement):
    key = "dfp"
    paper = Paper(title="Mixed Precision Training of Convolutional Neural Networks using Integer Operations",
                  url="https://arxiv.org/abs/1802.00930", arxiv="1802.00930")

    class Params(LinearReplacement.Params):
        bits: int = Field(16, ge=2, le=16, description="Bits per GEMM operand, two's complement (the paper: 16).")
        operands: tuple[Operand, ...] = Field(OPERANDS, min_length=1, description="GEMM inputs on the grid: P1 x, "
                                              "P2 W (forward); P3 dY, P4 W (input gradient); P5 dY, P6 x (weight "
                                              "gradient). Default: all six.")
        exponent: Literal["dynamic", "static"] = Field(
            "dynamic", description="dynamic: each operand's shared exponent follows its absmax at every use (DFP); "
                                   "static: frozen at its first use (the static fixed-point control).")
        rounding: Literal["nearest", "stochastic"] = Field("nearest", description="How operands round to the grid.")

        _each_operand_once = field_validator("operands")(checked_operands)

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        targets = self.targets(model)
        names = {id(linear): name for name, linear in targets.items()}  # errors name the layer
        self.replace(model, targets, lambda linear: DynamicFixedPointLinear(
            linear, names[id(linear)], p.bits, p.operands, p.exponent == "static", p.rounding == "stochastic"))

    def exponents(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """Each static layer's frozen binary point per operand (``{}`` for dynamic exponents)."""
        return {name: {which: int(f) for which, f in zip(OPERANDS, layer.frac_bits.tolist()) if f != UNSET}
                for name, layer in sorted(self.replaced(model).items()) if layer.static}

    def finalize(self, model: nn.Module) -> dict:
        p = self.params
        static_points = self.exponents(model)
        replaced = self.fold_back(model)
        return {"gemm_format": f"int{p.bits}", "exponent": p.exponent, "rounding": p.rounding,
                "bits_per_operand": p.bits, "quantized_operands": list(p.operands),
                "low_precision_layers": len(replaced), "static_frac_bits": static_points}
