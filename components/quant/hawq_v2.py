"""HAWQ-V2: Hessian AWare trace-Weighted Quantization (Dong et al., NeurIPS 2020, arXiv 1911.03852).

Weights only. Per targeted Linear ``i``: ``Tr(H_i)`` of the loss Hessian w.r.t. its weight by
Hutchinson's estimator (Rademacher probes, PyHessian's rule: stop at relative change ``tol``
or after ``hutchinson_samples``), and the paper's sensitivity
``Ω_i(b) = Tr(H_i)/n_i · ||Q_b(W_i) - W_i||²``. The bit configuration is the point of the
Pareto frontier of ``Σ_i Ω_i`` vs model size at the ``average_bits`` budget; the MILP
(min ΣΩ s.t. Σ n_i·b_i ≤ budget) returns exactly that frontier point. A coarse frontier is
stored in ``meta["pareto_frontier"]``.

One HVP serves every layer: a Rademacher vector spans all targeted weights and each layer's
slice ``v_iᵀ(Hv)_i`` is an unbiased estimate of its own trace (see
``sensitivity.hutchinson_traces``). ``ranking="reversed"`` is an ablation, not the paper's
method: the per-layer ``Tr/n`` values are handed out in reverse order (most sensitive layer
gets the least sensitive layer's value) before the same MILP.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import QuantizedModel, Quantizer
from components.quant.calibration import check_calibration
from components.quant.sensitivity import (MixedPrecisionParams, allocate_bits_milp, build_mixed_result,
                                          check_mixed_params, hessian_batch, hutchinson_traces, layer_setup,
                                          make_loss_closure, milp_frontier, nonnegative)
from components.registry import Paper


def reverse_ranking(values: dict[str, float]) -> dict[str, float]:
    """Hand the values out in reverse rank order: the largest goes to the layer with the smallest."""
    ascending = sorted(values, key=lambda m: values[m])
    return {m: values[r] for m, r in zip(ascending, reversed(ascending))}


class HawqV2Quantizer(Quantizer):
    key = "hawq_v2"
    paper = Paper(title="HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
                  url="https://arxiv.org/abs/1911.03852", arxiv="1911.03852")
    needs_calibration = True

    class Params(MixedPrecisionParams):
        hutchinson_samples: int = Field(50, gt=0, description="max Rademacher probes (PyHessian: 100)")
        hutchinson_tol: float = Field(1e-3, gt=0, description="relative change of every running trace "
                                                               "mean that stops early (PyHessian default)")
        ranking: Literal["hessian", "reversed"] = Field(
            "hessian", description="hessian: the paper; reversed: ablation with the sensitivity order inverted")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        options = check_mixed_params(self.key, p)
        self.refuse_if_quantized(model)
        calibration = check_calibration(calibration, self.key)
        linears, sizes, errors, _ = layer_setup(self, model, options)
        total = sum(sizes.values())
        budget = p.average_bits * total

        start = time.perf_counter()
        batch = hessian_batch(calibration, p.hessian_sequences)
        traces, used = hutchinson_traces(model, {m: [lin.weight] for m, lin in linears.items()},
                                         make_loss_closure(model, batch), p.hutchinson_samples,
                                         p.hutchinson_tol, p.seed)
        hessian_seconds = time.perf_counter() - start

        sensitivity = {m: nonnegative(traces[m]) / sizes[m] for m in linears}
        if p.ranking == "reversed":
            sensitivity = reverse_ranking(sensitivity)
        omega = {m: {b: sensitivity[m] * errors[m][b] for b in options} for m in linears}
        alloc = allocate_bits_milp(omega, sizes, budget)

        grid = sorted({min(options) + 0.5 * k for k in range(int(2 * (max(options) - min(options))) + 1)}
                      | {min(p.average_bits, max(options))})
        frontier = milp_frontier(omega, sizes, [g * total for g in grid])
        metrics = {"hessian_seconds": hessian_seconds, "hessian_tokens": int(batch.numel()),
                   "hutchinson_samples_used": int(used),
                   "omega_total": sum(omega[m][alloc[m]] for m in linears)}
        for m in linears:
            metrics[f"trace.{m}"] = float(traces[m])
        return build_mixed_result(
            model, linears, alloc, p, self.key, metrics,
            {"sensitivity": {m: float(sensitivity[m]) for m in linears}, "ranking": p.ranking,
             "pareto_frontier": [[size / total, cost] for size, cost, _ in frontier]})
