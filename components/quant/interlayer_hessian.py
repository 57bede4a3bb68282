"""Mixed-precision PTQ with inter-layer dependencies (Schaefer et al. 2023, arXiv 2306.04879).

The paper shows that per-layer Hessian sensitivities alone order layers poorly, augments them
with inter-layer dependency information, and runs a bisection search for a configuration
within a user-set accuracy-degradation bound. It publishes no code; the cross terms here follow
CLADO (arXiv 2307.05657), which measures them on a small data subset:

    ΔL(b) ≈ Σ_i c_i(b_i) + Σ_{i<j} Δ_ij(b_i, b_j),
    Δ_ij(a, b) = L(Q_i^a, Q_j^b) - L(Q_i^a) - L(Q_j^b) + L0   (measured).

``diagonal="measured"`` (default): ``c_i(b) = L(Q_i^b) - L0``, so the model is exact for any
configuration that quantizes at most two units, as in CLADO. ``diagonal="hessian"``:
``c_i(b) = ½·Tr(H_i)/n_i·||Q_b(W_i) - W_i||²`` (HAWQ-V2's trace sensitivity as the second-order
Taylor term, Hutchinson estimate). On the trained micro model that estimate is 5-50x below the
measured single-layer ΔL at 2 bits, so the measured (mostly negative, sub-additive) 2-bit cross
terms then dominate and the solver stacks 2-bit layers: use it only as an ablation. The
objective is minimised exactly by a linearised MILP (``sensitivity.allocate_bits_pairwise``).

``mode="size_budget"``: minimise the predicted ΔL under ``average_bits``.
``mode="loss_bound"``: bisection over the size budget for the smallest one whose configuration
increases the calibration loss by at most ``max_loss_increase`` (nats of mean next-token CE),
measured on ``loss_sequences`` calibration sequences (``verify="measured"``) or predicted.

Units: each targeted Linear, or (``units="group"``) the Linears of a block that share an input
(q/k/v, o, gate/up, down), which get one bit width. ``auto`` uses groups above 16 Linears to
keep the O(units²·bits²) pair measurements affordable. Pairs are measured for ``pair_bits``
(default: every option but the widest; Δ_ij involving the widest grid is taken as 0: the cross
term scales with the product of both layers' perturbations, and an 8-bit perturbation is ~16x
smaller than a 4-bit one). ``interactions=False`` drops the cross terms (diagonal-only ablation).
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import QuantizationError, QuantizedModel, Quantizer
from components.quant.calibration import check_calibration, decoder_blocks, linear_groups
from components.quant.sensitivity import (MixedPrecisionParams, allocate_bits_pairwise, allocation_applied,
                                          allocation_cost, bisect_budget, build_mixed_result,
                                          check_alloc_bits, check_mixed_params, hessian_batch,
                                          hutchinson_traces, layer_setup,
                                          loss_fn, make_loss_closure, nonnegative, pairwise_loss_terms)
from components.registry import Paper

MAX_LINEAR_UNITS = 16


class InterlayerHessianQuantizer(Quantizer):
    key = "interlayer_hessian"
    paper = Paper(title="Augmenting Hessians with Inter-Layer Dependencies for Mixed-Precision "
                        "Post-Training Quantization",
                  url="https://arxiv.org/abs/2306.04879", arxiv="2306.04879")
    needs_calibration = True

    class Params(MixedPrecisionParams):
        mode: Literal["size_budget", "loss_bound"] = Field(
            "size_budget", description="size_budget: best predicted loss at average_bits; loss_bound: "
                                       "smallest size within max_loss_increase (bisection)")
        max_loss_increase: float | None = Field(
            None, gt=0, description="loss_bound mode: allowed increase of mean next-token CE (nats)")
        verify: Literal["measured", "predicted"] = Field(
            "measured", description="loss_bound mode: check each bisection step by measuring the loss "
                                    "of the quantized model, or trust the predicted ΔL")
        bisection_resolution: float = Field(0.05, gt=0, description="loss_bound mode: stop when the size "
                                                                     "bracket is this many bits/weight wide")
        units: Literal["auto", "linear", "group"] = Field(
            "auto", description="bit-width units: each Linear, or Linears sharing an input within a block")
        diagonal: Literal["measured", "hessian"] = Field(
            "measured", description="per-unit term: measured ΔL, or ½·Tr(H)/n·||ΔW||² (Hutchinson)")
        interactions: bool = Field(True, description="False: drop the cross-layer terms (ablation)")
        pair_bits: list[int] | None = Field(
            None, description="bit widths whose pair terms are measured; None = all but the widest")
        pair_sequences: int = Field(8, gt=0, description="calibration sequences for measured loss terms")
        loss_sequences: int = Field(32, gt=0, description="calibration sequences for the loss-bound check")
        hutchinson_samples: int = Field(30, gt=0, description="max Rademacher probes (PyHessian: 100)")
        hutchinson_tol: float = Field(1e-3, gt=0, description="early-stop tolerance (PyHessian default)")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        options = check_mixed_params(self.key, p)
        if p.mode == "loss_bound" and p.max_loss_increase is None:
            raise QuantizationError(f"{self.key}: mode='loss_bound' needs max_loss_increase (got None)")
        self.refuse_if_quantized(model)
        calibration = check_calibration(calibration, self.key)
        linears, sizes, errors, quant = layer_setup(self, model, options)
        units = self._units(model, list(linears))
        unit_size = {u: sum(sizes[m] for m in ms) for u, ms in units.items()}
        total = sum(sizes.values())
        if p.pair_bits is None:
            pair_bits = options[:-1] if len(options) > 1 else options
        else:
            for b in p.pair_bits:
                check_alloc_bits(self.key, b)
            pair_bits = [b for b in options if b in p.pair_bits]

        metrics: dict = {}
        start = time.perf_counter()
        measured_pairs = p.interactions or p.diagonal == "measured"
        terms = None
        if measured_pairs:
            terms = pairwise_loss_terms(model, units, options, hessian_batch(calibration, p.pair_sequences),
                                        quantize=quant, pair_bits=pair_bits if p.interactions else [])
            metrics["loss_evaluations"] = terms.evaluations
            metrics["calibration_loss_fp"] = terms.base_loss
        metrics["pair_seconds"] = time.perf_counter() - start

        if p.diagonal == "hessian":
            start = time.perf_counter()
            batch = hessian_batch(calibration, p.hessian_sequences)
            traces, used = hutchinson_traces(model, {m: [lin.weight] for m, lin in linears.items()},
                                             make_loss_closure(model, batch), p.hutchinson_samples,
                                             p.hutchinson_tol, p.seed)
            metrics["hessian_seconds"] = time.perf_counter() - start
            metrics["hutchinson_samples_used"] = int(used)
            for m in linears:
                metrics[f"trace.{m}"] = float(traces[m])
            costs = {u: {b: sum(0.5 * nonnegative(traces[m]) / sizes[m] * errors[m][b] for m in ms)
                         for b in options} for u, ms in units.items()}
        else:
            costs = {u: dict(terms.single[u]) for u in units}
        pairs = terms.pair if (p.interactions and terms is not None) else {}

        def solve(budget):
            return allocate_bits_pairwise(costs, pairs, unit_size, budget)[0]

        def predicted(alloc):
            return allocation_cost(alloc, costs, pairs)

        if p.mode == "size_budget":
            unit_alloc = solve(p.average_bits * total)
        else:
            loss_tokens = hessian_batch(calibration, p.loss_sequences)
            base = loss_fn(model, loss_tokens)
            metrics["loss_bound_fp_loss"] = base

            def measured(alloc):
                with allocation_applied(linears, self._expand(alloc, units), quant):
                    return loss_fn(model, loss_tokens) - base

            low = min(options) * total
            high = max(options) * total
            unit_alloc, value, trace = bisect_budget(
                solve, measured if p.verify == "measured" else predicted, low, high, p.max_loss_increase,
                p.bisection_resolution * total)
            metrics["loss_bound_steps"] = len(trace)
            metrics["loss_bound_loss_increase"] = value
        metrics["predicted_loss_increase"] = predicted(unit_alloc)
        alloc = self._expand(unit_alloc, units)
        return build_mixed_result(model, linears, alloc, p, self.key, metrics,
                                  {"units": units, "mode": p.mode, "diagonal": p.diagonal,
                                   "interactions": p.interactions, "pair_bits": pair_bits})

    @staticmethod
    def _expand(unit_alloc, units):
        return {m: b for u, b in unit_alloc.items() for m in units[u]}

    def _units(self, model, targeted: list[str]) -> dict[str, list[str]]:
        mode = self.params.units
        if mode == "linear" or (mode == "auto" and len(targeted) <= MAX_LINEAR_UNITS):
            return {m: [m] for m in targeted}
        wanted = set(targeted)
        units: dict[str, list[str]] = {}
        for k, block in enumerate(decoder_blocks(model)):
            prefix = f"model.layers.{k}."
            for group in linear_groups(block):
                members = [prefix + n for n in group if prefix + n in wanted]
                if members:
                    units["+".join(members)] = members
        missing = wanted - {m for ms in units.values() for m in ms}
        for m in sorted(missing):  # targeted Linears outside the known groups: one unit each
            units[m] = [m]
        return units
