"""AdaQuant (Hubara et al. 2020, "Improving Post Training Neural Quantization: Layer-wise
Calibration and Integer Programming"; reference code itayhubara/CalibTIP utils/adaquant.py).

Layer-wise calibration: for each Linear, Adam on ``MSE(layer_q(X), Y_fp)`` over cached
calibration activations, optimising the weights themselves (a continuous perturbation
``ΔW``, quantized through a straight-through round) together with the quantization step
(LSQ-style: the STE gives the step its LSQ gradient) and, for asymmetric grids, the zero point.
Inputs come from the already-quantized model ("sequential AdaQuant"; ``input_stream="fp"`` is
the paper's parallel variant).

Learning rates. The reference uses absolute Adam lrs tuned for 8-bit ResNets: weights 1e-5,
weight quantizer range/zero point 1e-3, 100 steps of batch 50. Absolute weight lrs do not
transfer across models and bit widths, so here ``ΔW`` is parametrised in units of the initial
quantization step: ``weight_lr`` is the largest per-step move as a fraction of one grid step
(1e-5 on an 8-bit ResNet grid of ~4e-3 is ~2.5e-3 steps; at 3-4 bits, with few hundred steps,
we use 1e-2 so a weight can cross a rounding boundary). The step is learned in log space with
``lr`` 1e-3 (≈ the reference's 1e-3 on a range of order 1, i.e. ~0.1% per step).

Integer programming (paper section 4): with ``bit_budget`` set, every Linear is first calibrated
independently at each candidate bit width (fp inputs), the increase of the model's calibration
loss with only that layer quantized is measured, and :func:`allocate_bits_ilp` picks one width
per layer minimising the summed increases under the size budget (``scipy.optimize.milp``).
The final pass then runs sequential AdaQuant with those widths; each tensor stores its own bits.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, QuantizationError, QuantizedModel, Quantizer, uniform_int_meta
from components.quant.calibration import check_calibration
from components.quant.fake_quant import round_ste
from components.quant.reconstruction import (IntGrid, ReconstructionConfig, check_learned_bits, flatten_metrics,
                                             quantized_model, reconstruct, to_fp16_step)
from components.quant.rtn import quantize_tensor
from components.registry import Paper


class AdaQuantWeight:
    """The LearnableQuant of one Linear weight: ``W + ΔW`` on a learned (LSQ-style) grid."""

    def __init__(self, weight: torch.Tensor, grid: IntGrid, weight_lr: float = 2e-3, lr: float = 1e-2,
                 name: str = "weight"):
        grid.check(weight, name)
        self.weight = weight.detach().float().clone()
        self.grid, self.name, self.shape = grid, name, self.weight.shape
        _, scales, zeros, _ = quantize_tensor(self.weight, grid.bits, grid.granularity, grid.group_size,
                                              grid.symmetric, name)
        self.step0 = scales.float()                               # [rows, groups] RTN init
        self.delta = torch.nn.Parameter(torch.zeros(self.shape))  # ΔW in units of step0
        self.log_step = torch.nn.Parameter(torch.log(self.step0))
        self.zero = None if grid.symmetric else torch.nn.Parameter(zeros.float())
        self.weight_lr, self.lr = weight_lr, lr

    def parameters(self):
        qparams = [self.log_step] + ([self.zero] if self.zero is not None else [])
        return [{"params": [self.delta], "lr": self.weight_lr}, {"params": qparams, "lr": self.lr}]

    def perturbed(self) -> torch.Tensor:
        return self.weight + self.delta * self.grid.expand(self.step0, self.shape)

    def _zero(self, hard: bool) -> torch.Tensor:
        if self.zero is None:
            return self.grid.default_zero(self.step0)
        low, high = self.grid.code_range
        z = torch.clamp(self.zero, low, high)
        return torch.round(z.detach()) if hard else round_ste(z)

    def fake_weight(self) -> torch.Tensor:
        low, high = self.grid.code_range
        step = torch.exp(self.log_step).unsqueeze(-1)
        zero = self._zero(hard=False).unsqueeze(-1)
        # clamp before rounding (LSQ): weights outside the grid get no gradient, the step gets LSQ's
        q = round_ste(torch.clamp(self.grid.view(self.perturbed()) / step + zero, low, high))
        return ((q - zero) * step).reshape(self.shape)

    def regularization(self, step: int) -> float:
        return 0.0

    def finalize(self):
        with torch.no_grad():
            step16 = to_fp16_step(torch.exp(self.log_step))
            return self.grid.quantize(self.perturbed(), step16.float(), self._zero(hard=True), self.name)


def allocate_bits_ilp(layer_costs: dict[str, dict[int, float]], layer_sizes: dict[str, int],
                      budget_bits: float) -> dict[str, int]:
    """One bit width per layer minimising ``Σ layer_costs[l][b]`` subject to
    ``Σ layer_sizes[l] * b <= budget_bits`` (sizes in weights, so the budget counts code bits),
    solved exactly as a 0/1 integer program with ``scipy.optimize.milp``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(layer_costs)
    if not names:
        raise QuantizationError("allocate_bits_ilp: no layers to allocate")
    missing = [n for n in names if n not in layer_sizes]
    if missing:
        raise QuantizationError(f"allocate_bits_ilp: no size for layers {missing}")
    choices = [(n, b) for n in names for b in sorted(layer_costs[n])]
    if any(not layer_costs[n] for n in names):
        raise QuantizationError("allocate_bits_ilp: every layer needs at least one candidate bit width")
    smallest = sum(layer_sizes[n] * min(layer_costs[n]) for n in names)
    if budget_bits < smallest:
        raise QuantizationError(
            f"allocate_bits_ilp: budget of {budget_bits:g} bits is below the smallest possible size "
            f"{smallest} bits (every layer at its lowest candidate width)")
    cost = np.array([float(layer_costs[n][b]) for n, b in choices])
    one_per_layer = np.array([[1.0 if n == layer else 0.0 for n, _ in choices] for layer in names])
    size = np.array([[float(layer_sizes[n] * b) for n, b in choices]])
    result = milp(cost, integrality=np.ones(len(choices)), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(size, -np.inf, budget_bits)])
    if not result.success:
        raise QuantizationError(f"allocate_bits_ilp: the integer program failed: {result.message}")
    return {n: b for (n, b), x in zip(choices, result.x) if x > 0.5}


def lm_loss(model: PreTrainedModel, tokens: torch.Tensor, overrides: dict[str, torch.Tensor] | None = None,
            batch_size: int = 8) -> float:
    """Mean next-token cross-entropy on ``tokens`` with some weights replaced (model untouched)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            ids = tokens[s:s + batch_size]
            logits = functional_call(model, overrides or {}, args=(), kwargs=dict(input_ids=ids, use_cache=False),
                                     strict=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return total / count


class AdaQuantQuantizer(Quantizer):
    key = "adaquant"
    paper = Paper(title="Improving Post Training Neural Quantization: Layer-wise Calibration and Integer "
                        "Programming", url="https://arxiv.org/abs/2006.10518", arxiv="2006.10518")
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight code (ignored when bit_budget is set)")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "per_channel", description="one learned step per tensor, per output channel, or per group")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric grid around 0 (no stored zero points)")
        input_stream: Literal["quantized", "fp"] = Field(
            "quantized", description="layer inputs from the already-quantized model (sequential) or fp (parallel)")
        iters: int = Field(200, ge=0, description="Adam steps per Linear (reference: 100)")
        weight_lr: float = Field(2e-3, gt=0, description="Adam lr on ΔW, in units of the layer's initial grid step")
        lr: float = Field(1e-2, gt=0, description="Adam lr on log(step) and zero points (reference: 1e-3 on the range)")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step")
        schedule: Literal["constant", "cosine"] = Field(
            "cosine", description="lr schedule (reference: constant; cosine decay to 0 settles the few steps here)")
        bit_budget: float | None = Field(
            None, gt=0, description="average code bits per quantized weight (scales excluded); when set, "
                                    "per-layer widths come from the integer program over candidate_bits")
        candidate_bits: list[Literal[2, 3, 4, 8]] = Field(
            [2, 3, 4, 8], min_length=1, description="bit widths the integer program chooses from")
        sensitivity_sequences: int = Field(
            32, gt=0, description="calibration sequences used to measure each layer's loss increase")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        self.refuse_if_quantized(model)
        for bits in [p.bits] if p.bit_budget is None else sorted(set(p.candidate_bits)):
            check_learned_bits(self.key, bits)
        tokens = check_calibration(calibration, self.key)
        if p.bit_budget is not None and p.bit_budget < min(p.candidate_bits):
            raise QuantizationError(f"{self.key}: bit_budget={p.bit_budget} is below the smallest candidate width "
                                    f"{min(p.candidate_bits)} (candidate_bits={sorted(set(p.candidate_bits))})")
        linears = self.target_linears(model)
        names = [n for n, _ in linears]
        grids = {b: IntGrid(b, p.granularity, p.group_size, p.symmetric) for b in {p.bits, *p.candidate_bits}}
        for name, linear in linears:
            grids[p.bits].check(linear.weight, f"{name}.weight")
        config = ReconstructionConfig(mode="layer", iters=p.iters, batch_size=p.batch_size, input_stream=p.input_stream,
                                      schedule=p.schedule, seed=p.seed, keep_quants=False)
        meta: dict = {}
        metrics: dict = {}
        if p.bit_budget is None:
            bits_of = {n: p.bits for n in names}
        else:
            bits_of, costs = self._allocate(model, tokens, linears, grids, config)
            meta.update(bits=None, zero_point=None, bit_budget=p.bit_budget, bit_allocation=bits_of,
                        loss_increase={n: {str(b): c for b, c in cs.items()} for n, cs in costs.items()})
            metrics.update({f"{n}/bits": float(b) for n, b in bits_of.items()})

        def make(name, linear):
            return AdaQuantWeight(linear.weight, grids[bits_of[name]], p.weight_lr, p.lr, f"{name}.weight")

        result = reconstruct(model, tokens, make, config, names, self.key)
        metrics.update(flatten_metrics(result.metrics))
        meta = {**uniform_int_meta(p), **meta, "metrics": metrics,
                "reconstruction": dict(mode="layer", input_stream=p.input_stream, iters=p.iters)}
        return quantized_model(model, result.weights, self.key, meta,
                               {f"{n}.weight": grids[bits_of[n]] for n in names})

    def _allocate(self, model, tokens, linears, grids, config):
        """Measure each layer's calibration-loss increase at each candidate width, then solve the IP."""
        p = self.params
        names = [n for n, _ in linears]
        probe = tokens[:p.sensitivity_sequences]
        base = lm_loss(model, probe)
        parallel = replace(config, input_stream="fp")
        costs: dict[str, dict[int, float]] = {n: {} for n in names}
        for bits in sorted(set(p.candidate_bits)):
            def make(name, linear, bits=bits):
                return AdaQuantWeight(linear.weight, grids[bits], p.weight_lr, p.lr, f"{name}.weight")

            result = reconstruct(model, tokens, make, parallel, names, f"{self.key} ({bits}-bit probe)")
            for n in names:
                costs[n][bits] = lm_loss(model, probe, {f"{n}.weight": result.weights[f"{n}.weight"][3]}) - base
        sizes = {n: linear.weight.numel() for n, linear in linears}
        budget = p.bit_budget * sum(sizes.values())
        return allocate_bits_ilp(costs, sizes, budget), costs
