"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Keeps RTN's min-max grid (scales, zero points) fixed and learns, per weight, whether to round
down or up: ``W~ = s * (clamp(floor(W/s) + h(V) + z, 0, 2^b-1) - z)`` with the rectified
sigmoid ``h(V) = clamp(sigmoid(V) * (ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1 (paper eq. 23).
V starts where ``h(V)`` equals the fractional part of ``W/s`` (so the soft weight equals W), and
the rounding regulariser ``λ Σ (1 - |2h - 1|^β)`` (eq. 24) drives h to 0/1 while β anneals from
20 to 2 after a warm start of 20% of the iterations without it (cosine decay, as in
torch.ao.quantization.experimental.adaround_loss). The final weight rounds hard: up where h ≥ 0.5.

λ = 0.01: the value of the BRECQ and AIMET AdaRound implementations, whose reconstruction loss
sums the squared error over features and averages over samples, which is the engine's "mse"
(torch.ao's adaround_loss uses 0.001 with a per-element mean MSE instead).

The paper optimises layer by layer with the quantized model's inputs and fp outputs
(asymmetric reconstruction, eq. 25): ``mode="layer"``, ``input_stream="quantized"``;
``mode="block"`` gives BRECQ-style block reconstruction. The paper runs 10k Adam steps at lr 1e-3;
on our CPU budget we take far fewer steps with a larger lr so V can still travel the ~±2.4 that
saturates h (see Params).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, QuantizedModel, Quantizer, uniform_int_meta
from components.quant.reconstruction import (IntGrid, ReconstructionConfig, checked_grid_inputs, flatten_metrics,
                                             quantized_model, reconstruct)
from components.quant.rtn import quantize_tensor
from components.registry import Paper

ZETA, GAMMA = 1.1, -0.1  # rectified-sigmoid stretch (paper section 4, eq. 23)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with ``rectified_sigmoid(V) == h`` for h in [0, 1) (h = 0 maps inside the clamp)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


class AdaRoundWeight:
    """The LearnableQuant of one Linear weight (see module docstring)."""

    def __init__(self, weight: torch.Tensor, grid: IntGrid, iters: int, reg_lambda: float = 0.01,
                 beta_range: tuple[float, float] = (20.0, 2.0), warm_start: float = 0.2,
                 name: str = "weight"):
        grid.check(weight, name)
        weight = weight.detach().float()
        _, scales, zeros, _ = quantize_tensor(weight, grid.bits, grid.granularity, grid.group_size,
                                              grid.symmetric, name)
        self.grid, self.name, self.shape = grid, name, weight.shape
        self.scales = scales                                        # fp16 [rows, groups], fixed
        self.zero = (zeros.float() if zeros is not None else grid.default_zero(scales.float()))
        self.step = scales.float().unsqueeze(-1)
        scaled = grid.view(weight) / self.step
        self.floor = torch.floor(scaled)
        self.V = torch.nn.Parameter(inverse_rectified_sigmoid(scaled - self.floor))
        self.iters, self.reg_lambda = iters, reg_lambda
        self.beta_range, self.warm_start = beta_range, warm_start

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V)

    def parameters(self):
        return [self.V]

    def _weight(self, rounding: torch.Tensor) -> torch.Tensor:
        low, high = self.grid.code_range
        zero = self.zero.unsqueeze(-1)
        codes = torch.clamp(self.floor + rounding + zero, low, high)
        return ((codes - zero) * self.step).reshape(self.shape)

    def fake_weight(self) -> torch.Tensor:
        return self._weight(self.h())

    def beta(self, step: int) -> float | None:
        """The annealed exponent at ``step``, None during the warm start (no regulariser)."""
        start = self.warm_start * self.iters
        if step < start:
            return None
        rel = (step - start) / max(self.iters - start, 1)
        high, low = self.beta_range
        return low + 0.5 * (high - low) * (1 + math.cos(rel * math.pi))

    def regularization(self, step: int) -> torch.Tensor | float:
        beta = self.beta(step)
        if beta is None:
            return 0.0
        return self.reg_lambda * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def finalize(self):
        with torch.no_grad():
            up = (self.h() >= 0.5).float()
            low, high = self.grid.code_range
            codes = torch.clamp(self.floor + up + self.zero.unsqueeze(-1), low, high)
            return self.grid.encode(codes, self.scales, self.zero, self.shape, self.name)


class AdaRoundQuantizer(Quantizer):
    key = "adaround"
    paper = Paper(title="Up or Down? Adaptive Rounding for Post-Training Quantization",
                  url="https://arxiv.org/abs/2004.10568", arxiv="2004.10568")
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight code")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "per_channel", description="one RTN scale per tensor, per output channel, or per group")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric grid around 0 (no stored zero points)")
        mode: Literal["layer", "block"] = Field(
            "layer", description="reconstruct each Linear's output (the paper) or each decoder block's (BRECQ)")
        input_stream: Literal["quantized", "fp"] = Field(
            "quantized", description="unit inputs from the already-quantized model (paper eq. 25) or the fp model")
        iters: int = Field(200, ge=0, description="Adam steps per unit (paper: 10k; CPU budget here)")
        lr: float = Field(5e-2, gt=0, description="Adam lr on V (paper: 1e-3 over 10k steps; larger here so V "
                                                  "can saturate h in a few hundred steps)")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step")
        reg_lambda: float = Field(0.01, ge=0, description="λ of the rounding regulariser (BRECQ/AIMET value)")
        beta_start: float = Field(20.0, gt=0, description="β at the end of the warm start")
        beta_end: float = Field(2.0, gt=0, description="β at the last step")
        warm_start: float = Field(0.2, ge=0, lt=1, description="fraction of steps without the regulariser")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        tokens, grid, linears = checked_grid_inputs(self, model, calibration)
        config = ReconstructionConfig(mode=p.mode, iters=p.iters, lr=p.lr, batch_size=p.batch_size,
                                      input_stream=p.input_stream, seed=p.seed, keep_quants=False)

        def make(name, linear):
            return AdaRoundWeight(linear.weight, grid, p.iters, p.reg_lambda, (p.beta_start, p.beta_end),
                                  p.warm_start, f"{name}.weight")

        result = reconstruct(model, tokens, make, config, [n for n, _ in linears], self.key)
        meta = dict(**uniform_int_meta(p), metrics=flatten_metrics(result.metrics),
                    reconstruction=dict(mode=p.mode, input_stream=p.input_stream, iters=p.iters, lr=p.lr))
        return quantized_model(model, result.weights, self.key, meta, {n: grid for n in result.weights})

