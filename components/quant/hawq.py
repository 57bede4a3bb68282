"""HAWQ: Hessian AWare Quantization (Dong et al., ICCV 2019, arXiv 1905.03696), weights only.

Per targeted Linear ``i``: ``λ_i`` = top eigenvalue of the loss Hessian w.r.t. its weight
(power iteration on Hessian-vector products of the next-token loss on calibration tokens).
The paper ranks blocks by ``S_i = λ_i / n_i`` (``n_i`` = parameters of the block) and gives
higher-ranked blocks more bits; it picks the actual bit widths by hand and orders block-wise
fine-tuning by ``Ω_i = λ_i·||Q(W_i) - W_i||²``. Here the manual step is made automatic
(``allocation="ordering"``, default): among all assignments whose bits never increase down
the ``S`` ranking and fit the ``average_bits`` budget, take the one with the smallest
``Σ_i λ_i·||Q_{b_i}(W_i) - W_i||²``. ``allocation="milp"`` drops the monotonicity and solves
the same objective with the MILP. Rounding is plain RTN (no fine-tuning: this is PTQ).
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
                                          check_mixed_params, hessian_batch, layer_setup, make_loss_closure,
                                          monotone_allocation, nonnegative, top_eigenvalues)
from components.registry import Paper


class HawqQuantizer(Quantizer):
    key = "hawq"
    paper = Paper(title="HAWQ: Hessian AWare Quantization of Neural Networks with Mixed-Precision",
                  url="https://arxiv.org/abs/1905.03696", arxiv="1905.03696")
    needs_calibration = True

    class Params(MixedPrecisionParams):
        hessian_sequences: int = Field(4, gt=0, description="calibration sequences in the Hessian batch")
        power_iters: int = Field(20, gt=0, description="max power iterations per layer (PyHessian: 100)")
        power_tol: float = Field(1e-3, gt=0, description="relative change of the eigenvalue that stops "
                                                          "the iteration (PyHessian default)")
        allocation: Literal["ordering", "milp"] = Field(
            "ordering", description="ordering: bits non-increasing along the λ/n ranking (the paper's "
                                    "rule); milp: unconstrained MILP on λ·||ΔW||²")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        options = check_mixed_params(self.key, p)
        self.refuse_if_quantized(model)
        calibration = check_calibration(calibration, self.key)
        linears, sizes, errors, _ = layer_setup(self, model, options)
        budget = p.average_bits * sum(sizes.values())

        start = time.perf_counter()
        batch = hessian_batch(calibration, p.hessian_sequences)
        eig, iters = top_eigenvalues(model, {m: [lin.weight] for m, lin in linears.items()},
                                     make_loss_closure(model, batch), p.power_iters, p.power_tol, p.seed)
        hessian_seconds = time.perf_counter() - start

        lam = {m: nonnegative(eig[m]) for m in linears}
        sensitivity = {m: lam[m] / sizes[m] for m in linears}
        omega = {m: {b: lam[m] * errors[m][b] for b in options} for m in linears}
        if p.allocation == "ordering":
            ranking = sorted(linears, key=lambda m: -sensitivity[m])
            alloc = monotone_allocation(ranking, omega, sizes, budget)
        else:
            alloc = allocate_bits_milp(omega, sizes, budget)

        metrics = {"hessian_seconds": hessian_seconds, "hessian_tokens": int(batch.numel()),
                   "omega_total": sum(omega[m][alloc[m]] for m in linears)}
        for m in linears:
            metrics[f"eigenvalue.{m}"] = float(eig[m])
            metrics[f"power_iterations.{m}"] = int(iters[m])
        return build_mixed_result(model, linears, alloc, p, self.key, metrics,
                                  {"sensitivity": {m: float(sensitivity[m]) for m in linears},
                                   "allocation_rule": p.allocation})
