"""FlexRound (Lee et al. 2023, "FlexRound: Learnable Rounding based on Element-wise Division for
Post-Training Quantization"; reference code robotseye/FlexRound_LRQ quant/UniformAffineQuantizer.py).

Rounding by element-wise *division* with learnable scales:

    W_int = clamp(round_ste(W / exp(log s1 + log S2 + log s3 [+ log s4])), grid range)
    W^    = W_int * s1

``s1`` is the common quantization step (one per tensor, output channel or group: the packed fp16
scale), initialised by a grid search minimising ``Σ|W - Q(W)|^2.4`` over 100 shrink factors of
the min-max range (reference ``perform_1D_search``/``lp_loss(p=2.4)``; for asymmetric grids the
reference also searches the zero point in 2-D, we shrink the range and keep RTN's zero-point
rule). ``S2`` (element-wise, shape of W) and ``s3`` (per output row) start at 1 (log = 0); ``s1``
is learned too. The paper's extra ``s4`` (per input column) is optional (``column_scale``): the
reference's ``flexround`` mode for Linear layers learns only s1, S2, s3 (its ``lrq`` mode adds
row and column vectors). The codes are ``W_int`` (+ zero point) and the scale is ``s1`` rounded
to fp16, so the packed int format applies directly. Learned by block-wise output
reconstruction (BRECQ-style, L2) with Adam and a cosine lr decay, as in the reference.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, QuantizedModel, Quantizer, uniform_int_meta
from components.quant.fake_quant import round_ste
from components.quant.reconstruction import (IntGrid, ReconstructionConfig, checked_grid_inputs, flatten_metrics,
                                             quantized_model, reconstruct, to_fp16_step)
from components.registry import Paper


def lp_grid_search(weight: torch.Tensor, grid: IntGrid, p: float = 2.4, n_grid: int = 100):
    """Step and zero point ``[rows, groups]`` minimising ``Σ|W - Q(W)|^p`` per group over the
    shrink factors ``i/n_grid`` (i = 1..n_grid) of the min-max range; i = n_grid is RTN's range,
    so the result is never worse than RTN in this norm."""
    rows = grid.view(weight.detach().float())
    low_code, high_code = grid.code_range
    if grid.symmetric:
        base = rows.abs().amax(-1) / (high_code - grid.implicit_zero)
        zero = grid.default_zero(base)
    else:
        low = rows.amin(-1).clamp(max=0)
        high = rows.amax(-1).clamp(min=0)
        base = (high - low) / grid.levels
    base = torch.where(base > 0, base, torch.ones_like(base))  # all-zero group: any step is exact
    best_err = torch.full_like(base, float("inf"))
    best_step = base.clone()
    best_zero = zero.clone() if grid.symmetric else torch.zeros_like(base)
    for i in range(1, n_grid + 1):
        step = base * (i / n_grid)
        if not grid.symmetric:
            zero = torch.clamp(torch.round(-low * (i / n_grid) / step), 0, grid.levels)
        codes = torch.clamp(torch.round(rows / step.unsqueeze(-1)) + zero.unsqueeze(-1), low_code, high_code)
        err = ((codes - zero.unsqueeze(-1)) * step.unsqueeze(-1) - rows).abs().pow(p).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        best_zero = torch.where(better, zero, best_zero)
    return best_step, best_zero


class FlexRoundWeight:
    """The LearnableQuant of one Linear weight (see module docstring)."""

    def __init__(self, weight: torch.Tensor, grid: IntGrid, column_scale: bool = False, p: float = 2.4,
                 n_grid: int = 100, name: str = "weight"):
        grid.check(weight, name)
        self.weight = weight.detach().float().clone()
        self.grid, self.name, self.shape = grid, name, self.weight.shape
        step, zero = lp_grid_search(self.weight, grid, p, n_grid)
        self.zero = zero                                        # [rows, groups], fixed integers
        self.log_s1 = torch.nn.Parameter(torch.log(to_fp16_step(step).float()))
        self.log_S2 = torch.nn.Parameter(torch.zeros(self.shape))
        self.log_s3 = torch.nn.Parameter(torch.zeros(self.shape[0], 1))
        self.log_s4 = torch.nn.Parameter(torch.zeros(1, self.shape[1])) if column_scale else None

    def parameters(self):
        return [t for t in (self.log_s1, self.log_S2, self.log_s3, self.log_s4) if t is not None]

    def _divisor_log(self) -> torch.Tensor:
        log = self.grid.expand(self.log_s1, self.shape) + self.log_S2 + self.log_s3
        return log + self.log_s4 if self.log_s4 is not None else log

    def _int_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of ``W_int`` (= code - zero) as tensors broadcastable to W."""
        low, high = self.grid.code_range
        zero = self.grid.expand(self.zero, self.shape)
        return low - zero, high - zero

    def fake_weight(self) -> torch.Tensor:
        low, high = self._int_range()
        w_int = torch.clamp(round_ste(self.weight / torch.exp(self._divisor_log())), low, high)
        return w_int * torch.exp(self.grid.expand(self.log_s1, self.shape))

    def regularization(self, step: int) -> float:
        return 0.0

    def finalize(self):
        with torch.no_grad():
            low, high = self._int_range()
            w_int = torch.clamp(torch.round(self.weight / torch.exp(self._divisor_log())), low, high)
            codes = self.grid.view(w_int) + self.zero.unsqueeze(-1)
            return self.grid.encode(codes, to_fp16_step(torch.exp(self.log_s1)), self.zero, self.shape, self.name)


class FlexRoundQuantizer(Quantizer):
    key = "flexround"
    paper = Paper(title="FlexRound: Learnable Rounding based on Element-wise Division for Post-Training "
                        "Quantization", url="https://arxiv.org/abs/2306.00317", arxiv="2306.00317")
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight code")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "per_channel", description="s1 (the packed scale) per tensor, per output channel, or per group")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric grid around 0 (no stored zero points)")
        mode: Literal["layer", "block", "window"] = Field(
            "block", description="reconstruction unit: a Linear, a decoder block (the paper), or a window of blocks")
        window: int = Field(2, ge=1, description="blocks per unit (mode=window)")
        overlap: int = Field(1, ge=0, description="blocks shared by consecutive windows (mode=window)")
        input_stream: Literal["quantized", "fp"] = Field(
            "quantized", description="unit inputs from the already-quantized model or the fp model")
        iters: int = Field(200, ge=0, description="Adam steps per unit (reference: 5000 per block on Llama 2)")
        lr: float = Field(1e-2, gt=0, description="Adam lr on log s1, log S2, log s3 (reference: 3e-3 W4, "
                                                  "2.5e-3 W3, with 5000 steps), cosine-decayed to 0")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step")
        column_scale: bool = Field(False, description="also learn a per-input-column log s4")
        grid_p: float = Field(2.4, gt=0, description="p of the Lp error minimised by the s1 grid search")
        loss: Literal["mse", "mse+cos"] = Field("mse", description="reconstruction loss")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        tokens, grid, linears = checked_grid_inputs(self, model, calibration)
        config = ReconstructionConfig(mode=p.mode, iters=p.iters, lr=p.lr, batch_size=p.batch_size,
                                      input_stream=p.input_stream, window=p.window, overlap=p.overlap,
                                      schedule="cosine", loss=p.loss, seed=p.seed, keep_quants=False)

        def make(name, linear):
            return FlexRoundWeight(linear.weight, grid, p.column_scale, p.grid_p, name=f"{name}.weight")

        result = reconstruct(model, tokens, make, config, [n for n, _ in linears], self.key)
        meta = dict(**uniform_int_meta(p), metrics=flatten_metrics(result.metrics),
                    reconstruction=dict(mode=p.mode, input_stream=p.input_stream, iters=p.iters, lr=p.lr))
        return quantized_model(model, result.weights, self.key, meta, {n: grid for n in result.weights})
