"""CBQ (Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", arXiv 2312.07950,
ICLR 2025). No code is published; this follows the paper's description as read from summaries of
its v5 text (the full PDF was not readable here), with our choices marked.

- **Cross-block dependency (CBD):** the engine's ``window`` mode: ``window`` consecutive decoder
  blocks are reconstructed together (the loss is on the last block's output), windows slide by
  ``window - overlap`` blocks and a block in the overlap keeps its learnable state and is optimised
  again by the next window (paper default: 2 blocks, overlap 1). ``mode="block"`` is window 1.
- **LoRA-Rounding:** AdaRound's rounding ``W~ = s * (clamp(floor(W/s0) + h(V) + z) - z)`` with the
  rectified sigmoid ``h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1, but the per-weight
  ``V`` (d×k parameters) replaced by a low-rank product ``A1 A2`` (A1 d×r, A2 r×k: (d + k)·r
  parameters), as the paper states ("V = A1 A2"). The paper does not say how A1 A2 starts; our
  default ``lora_base="adaround"`` learns a low-rank *update* of AdaRound's initial V0 (the fixed
  inverse-sigmoid of the fractional parts, so the soft weight starts at W exactly: V = V0 + A1 A2,
  A2 = 0 at the start, the usual LoRA init); ``lora_base="none"`` is the literal V = A1 A2 (h = 0.5
  at the start). ``rank=0`` gives a full-rank V (AdaRound inside CBQ, the paper's ablation). The
  rounding regulariser is AdaRound's ``λ Σ (1 - |2h - 1|^β)`` with β annealed 20 -> 2 after a 20%
  warm start; a summary renders the paper's as ``Σ (1 - |2ΔW - 1|)^β``: we keep AdaRound's form.
- **Step sizes learned jointly** with the rounding (paper: "quantization step sizes and weight-
  compensated matrices"): ``s = exp(log s)`` per group, starting from ``step_init``: the Lp
  (p = 2.4) shrink search of flexround.py (default; it truncates weight outliers, our stand-in
  for CBQ's coarse-to-fine weight-outlier truncation, whose quartile/variance detector is not
  implemented) or min-max. The integer grid ``floor(W/s0)`` is fixed at the initial step, so a
  learned step rescales the grid without re-deciding which integer each weight sits next to.
- **Loss:** ``||h_fp - h_q||² + KL(softmax(h_fp) || softmax(h_q))`` on the window's output hidden
  states (the paper's L2 + KLD; ``loss="mse"`` drops the KL). Softmax over the hidden dimension of
  each token, as the paper's ``D_KL(σ(h1), σ(h2))`` reads; it costs one softmax per step, so it is
  on by default.
- Activation quantization (the paper's W4A4/W4A8, with learned activation steps and CFP's
  activation scaling) is not reproduced: the generic ``activations`` param adds dynamic per-token
  (or per-tensor) fake-quant at evaluation only.

Adam with a cosine decay over ``iters`` steps per window, ``input_stream="quantized"`` (the
quantized model's window inputs, fp targets).

Measured on our tiny models (same ``iters`` per unit): with LoRA-Rounding, window 2 / overlap 1
leaves ~2-3% less last-block error than single blocks at W3 on the 2-block nano model and ties on
the 4-block micro model; with a full-rank V single blocks win on nano (one 2-block window gets half
the steps per block there). LoRA-Rounding (rank 4-8, ~5% of AdaRound's rounding parameters) ends
at ~1.8-2x the full-rank reconstruction error.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.adaround import inverse_rectified_sigmoid, rectified_sigmoid
from components.quant.base import CalibratedParams, QuantizedModel, Quantizer, uniform_int_meta
from components.quant.flexround import lp_grid_search
from components.quant.reconstruction import (IntGrid, ReconstructionConfig, checked_grid_inputs, flatten_metrics,
                                             quantized_model, reconstruct, to_fp16_step)
from components.quant.rtn import quantize_tensor
from components.registry import Paper


def mse_kl_loss(kl_weight: float = 1.0):
    """The engine's "mse" (squared error summed over features, mean over tokens) plus
    ``kl_weight * KL(softmax(fp) || softmax(q))`` over the feature dim, mean over tokens."""
    def loss(q: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        mse = (q - fp).pow(2).sum(-1).mean()
        log_p, log_q = F.log_softmax(fp.float(), -1), F.log_softmax(q.float(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return mse + kl_weight * kl
    return loss


class LoraRoundingWeight:
    """The LearnableQuant of one Linear weight (see module docstring)."""

    def __init__(self, weight: torch.Tensor, grid: IntGrid, rank: int, iters: int, generator: torch.Generator,
                 lr: float, step_lr: float, reg_lambda: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0),
                 warm_start: float = 0.2, learn_step: bool = True, step_init: str = "lp",
                 lora_base: str = "adaround", name: str = "weight"):
        grid.check(weight, name)
        w = weight.detach().float()
        self.grid, self.name, self.shape, self.rank = grid, name, w.shape, rank
        if step_init == "lp":
            step, zero = lp_grid_search(w, grid)
        elif step_init == "minmax":
            _, scales, zeros, _ = quantize_tensor(w, grid.bits, grid.granularity, grid.group_size, grid.symmetric,
                                                  name)
            step = scales.float()
            zero = zeros.float() if zeros is not None else grid.default_zero(step)
        else:
            raise ValueError(f"unknown step_init {step_init!r}; use 'lp' or 'minmax'")
        step = to_fp16_step(step).float()
        self.zero = zero.float()                                    # [rows, groups], fixed integers
        self.log_step = torch.nn.Parameter(torch.log(step), requires_grad=learn_step)
        self.learn_step = learn_step
        scaled = grid.view(w) / step.unsqueeze(-1)
        self.floor = torch.floor(scaled)                            # [rows, groups, size], fixed
        v0 = inverse_rectified_sigmoid(scaled - self.floor).reshape(self.shape)
        out_f, in_f = self.shape
        if rank == 0:  # full-rank V: AdaRound's rounding inside CBQ
            self.V = torch.nn.Parameter(v0.clone())
            self.v0 = self.A1 = self.A2 = None
        else:
            if lora_base not in ("adaround", "none"):
                raise ValueError(f"unknown lora_base {lora_base!r}; use 'adaround' or 'none'")
            self.V = None
            self.v0 = v0 if lora_base == "adaround" else torch.zeros(self.shape)
            self.A1 = torch.nn.Parameter(torch.randn(out_f, rank, generator=generator) / math.sqrt(rank))
            self.A2 = torch.nn.Parameter(torch.zeros(rank, in_f))
        self.iters, self.reg_lambda, self.beta_range, self.warm_start = iters, reg_lambda, beta_range, warm_start
        self.lr, self.step_lr = lr, step_lr

    def v(self) -> torch.Tensor:
        return self.V if self.V is not None else self.v0 + self.A1 @ self.A2

    def h(self) -> torch.Tensor:
        """Rounding offsets in [0, 1], as the ``[rows, groups, size]`` view."""
        return self.grid.view(rectified_sigmoid(self.v()))

    def rounding_parameters(self) -> list[torch.Tensor]:
        return [self.V] if self.V is not None else [self.A1, self.A2]

    def parameters(self):
        groups = [{"params": self.rounding_parameters(), "lr": self.lr}]
        if self.learn_step:
            groups.append({"params": [self.log_step], "lr": self.step_lr})
        return groups

    def learnable_count(self) -> tuple[int, int]:
        """(rounding parameters, step parameters)."""
        return (sum(t.numel() for t in self.rounding_parameters()),
                self.log_step.numel() if self.learn_step else 0)

    def _weight(self, rounding: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        low, high = self.grid.code_range
        zero = self.zero.unsqueeze(-1)
        codes = torch.clamp(self.floor + rounding + zero, low, high)
        return ((codes - zero) * step.unsqueeze(-1)).reshape(self.shape)

    def fake_weight(self) -> torch.Tensor:
        return self._weight(self.h(), torch.exp(self.log_step))

    def beta(self, step: int) -> float | None:
        """AdaRound's annealed exponent at ``step``; None during the warm start (no regulariser)."""
        start = self.warm_start * self.iters
        if step < start:
            return None
        rel = (step - start) / max(self.iters - start, 1)
        high, low = self.beta_range
        return low + 0.5 * (high - low) * (1 + math.cos(rel * math.pi))

    def regularization(self, step: int) -> torch.Tensor | float:
        beta = self.beta(step % max(self.iters, 1))  # a block optimised again by the next window restarts it
        if beta is None:
            return 0.0
        return self.reg_lambda * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def finalize(self):
        with torch.no_grad():
            up = (self.h() >= 0.5).float()
            low, high = self.grid.code_range
            codes = torch.clamp(self.floor + up + self.zero.unsqueeze(-1), low, high)
            return self.grid.encode(codes, to_fp16_step(torch.exp(self.log_step)), self.zero, self.shape, self.name)


class CbqQuantizer(Quantizer):
    key = "cbq"
    paper = Paper(title="CBQ: Cross-Block Quantization for Large Language Models",
                  url="https://arxiv.org/abs/2312.07950", arxiv="2312.07950")
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight code (paper: W2, W4)")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "per_channel", description="one learned step per tensor, per output channel, or per group")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(False, description="symmetric grid; asymmetric (with zero points) by default, "
                                                   "as the OmniQuant-style LLM PTQ CBQ compares with [guess]")
        mode: Literal["block", "window"] = Field(
            "window", description="cross-block windows (CBD, the paper) or one block at a time (window 1)")
        window: int = Field(2, ge=1, description="blocks per window (paper: 2)")
        overlap: int = Field(1, ge=0, description="blocks shared by consecutive windows (paper: 1)")
        input_stream: Literal["quantized", "fp"] = Field(
            "quantized", description="window inputs from the already-quantized model or the fp model")
        rank: int = Field(8, ge=0, description="rank r of V = A1 A2 (LoRA-Rounding); 0 = full-rank V (AdaRound)")
        lora_base: Literal["adaround", "none"] = Field(
            "adaround", description="V = V0 + A1 A2 from AdaRound's init V0 (ours) or the literal V = A1 A2")
        learn_step: bool = Field(True, description="learn the step sizes jointly with the rounding")
        step_init: Literal["lp", "minmax"] = Field(
            "lp", description="initial step: Lp (p=2.4) shrink search (clips outliers) or min-max")
        iters: int = Field(200, ge=0, description="Adam steps per window (CPU budget)")
        lr: float = Field(3e-3, gt=0, description="Adam lr of the rounding parameters A1, A2 (cosine-decayed); "
                                                  "a full-rank V (rank=0) wants AdaRound's larger 5e-2")
        step_lr: float = Field(1e-3, gt=0, description="Adam lr of log(step)")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step")
        loss: Literal["mse", "mse+kl"] = Field("mse+kl", description="window-output L2, plus the paper's KL term")
        kl_weight: float = Field(1.0, ge=0, description="weight of the KL term (loss=mse+kl)")
        reg_lambda: float = Field(0.01, ge=0, description="λ of AdaRound's rounding regulariser")
        beta_start: float = Field(20.0, gt=0, description="β at the end of the warm start")
        beta_end: float = Field(2.0, gt=0, description="β at the last step")
        warm_start: float = Field(0.2, ge=0, lt=1, description="fraction of steps without the regulariser")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        tokens, grid, linears = checked_grid_inputs(self, model, calibration)
        config = ReconstructionConfig(mode=p.mode, iters=p.iters, lr=p.lr, batch_size=p.batch_size,
                                      input_stream=p.input_stream, window=p.window, overlap=p.overlap,
                                      schedule="cosine", seed=p.seed,
                                      loss=mse_kl_loss(p.kl_weight) if p.loss == "mse+kl" else "mse")
        generator = torch.Generator().manual_seed(p.seed)

        def make(name, linear):
            return LoraRoundingWeight(linear.weight, grid, p.rank, p.iters, generator, p.lr, p.step_lr,
                                      p.reg_lambda, (p.beta_start, p.beta_end), p.warm_start, p.learn_step,
                                      p.step_init, p.lora_base, f"{name}.weight")

        result = reconstruct(model, tokens, make, config, [n for n, _ in linears], self.key)
        counts = [q.learnable_count() for q in result.quants.values()]
        meta = dict(**uniform_int_meta(p), metrics=flatten_metrics(result.metrics),
                    reconstruction=dict(mode=p.mode, window=p.window, overlap=p.overlap, input_stream=p.input_stream,
                                        iters=p.iters, lr=p.lr, loss=p.loss),
                    learnable_parameters=dict(rounding=sum(c[0] for c in counts), steps=sum(c[1] for c in counts),
                                              adaround_equivalent=sum(q.shape.numel() for q in result.quants.values()),
                                              rank=p.rank))
        return quantized_model(model, result.weights, self.key, meta, {n: grid for n in result.weights})
