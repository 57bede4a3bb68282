"""One-shot pruning of a trained model: the base class, the sparsity patterns, the block walk.

A pruner zeroes weights of the ``nn.Linear`` layers inside the decoder blocks (never the
embeddings or ``lm_head``) and returns a model of the same shape that plain ``transformers``
loads. Patterns: ``unstructured`` at a ``sparsity`` (the fraction of weights set to zero), or
``N:M``: at most N non-zeros in every M consecutive input weights of a row (``2:4`` is the
pattern sparse tensor cores run), which fixes the sparsity at ``1 - N/M``.

Calibrated pruners (Wanda, SparseGPT) walk the blocks in order as GPTQ does: one forward per
block collects every Linear's input Hessian ``2/n XᵀX`` (``walk_blocks_with_hessians``, GPTQ's walk),
the block is pruned, and the pruned block's outputs feed the next block. The facts report the
sparsity measured on the pruned weights, layer by layer, and each layer's output error
``||XWᵀ - XŴᵀ||²/(n·out)`` next to magnitude pruning's at the same pattern on the same inputs.
"""
from __future__ import annotations

import re

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel

from components.quant.base import QUANT_CONFIG_ATTR
from components.quant.calibration import capture_block_inputs, check_calibration, linear_groups, walk_blocks_with_hessians
from components.quant.gptq_solver import output_error
from components.registry import Method, MethodParams

PATTERN = re.compile(r"^(\d+):(\d+)$")


class PruneError(ValueError):
    """A model, pattern or parameter combination that cannot be pruned as asked."""


class PruneParams(MethodParams):
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M': at most N non-zeros in every M "
                                                     "consecutive input weights of a row (e.g. '2:4')")
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's weights set to zero; "
                                   "unstructured only (N:M fixes it at 1 - N/M)")

    @model_validator(mode="after")
    def _pattern_and_sparsity(self):
        if self.pattern == "unstructured":
            if self.sparsity is None:
                raise ValueError("pattern 'unstructured' needs a sparsity (the fraction of weights to zero)")
            return self
        match = PATTERN.match(self.pattern)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"pattern {self.pattern!r}: expected 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
        if self.sparsity is not None:
            raise ValueError(f"pattern {self.pattern!r} fixes the sparsity at 1 - N/M; drop `sparsity`")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = PATTERN.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def target_sparsity(self) -> float:
        n_m = self.n_m
        return 1 - n_m[0] / n_m[1] if n_m else float(self.sparsity)


class CalibratedPruneParams(PruneParams):
    calibration_sequences: int = Field(64, gt=0, description="training-split token blocks used as calibration data")
    batch_size: int = Field(8, gt=0, description="calibration sequences per forward pass")
    seed: int = Field(0, description="picks the calibration sequences")


def check_width(params: PruneParams, cols: int, name: str) -> tuple[int, int] | None:
    """The pattern's (N, M), once the input width ``cols`` is known to hold whole groups of M."""
    n_m = params.n_m
    if n_m and cols % n_m[1]:
        raise PruneError(f"{name}: pattern {params.pattern} needs the input width {cols} to be a multiple of {n_m[1]}")
    return n_m


def keep_mask(scores: torch.Tensor, params: PruneParams, per_row: bool, name: str) -> torch.Tensor:
    """True where a weight stays: the highest ``scores`` of each row (``per_row``) or of the whole
    matrix, or, for N:M, the N highest of every M consecutive columns of a row."""
    n_m = check_width(params, scores.shape[1], name)
    rows, cols = scores.shape
    if n_m:
        n, m = n_m
        groups = scores.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(rows, cols)
    flat = scores if per_row else scores.reshape(1, -1)
    dropped = int(params.sparsity * flat.shape[1])  # rounded down, as the reference implementations
    keep = torch.ones_like(flat, dtype=torch.bool)
    if dropped:
        keep.scatter_(1, flat.topk(dropped, dim=1, largest=False).indices, False)
    return keep.reshape(rows, cols)


def measured_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


class Pruner(Method):
    """Zeroes weights of a trained model's block Linears; ``prune_weight`` is the method."""

    Params = CalibratedPruneParams
    needs_calibration = True  # False: no tokens input, no calibration params (magnitude)

    def prune_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, name: str) -> torch.Tensor:
        """The pruned copy of one weight ``[out, in]`` (fp32), given its input Hessian."""
        raise NotImplementedError

    def prune(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> dict:
        """Prune ``model`` in place; returns its facts (pattern, measured sparsity per layer, errors)."""
        self._refuse_quantized(model)
        p = self.params
        layers: dict[str, dict] = {}
        inputs = None
        if self.needs_calibration:
            tokens = check_calibration(calibration, self.key)
            inputs = capture_block_inputs(model, tokens, p.batch_size)

        def edit(prefix: str, linears: dict, group: list[str], hessian: torch.Tensor | None) -> None:
            for n in group:
                layers[prefix + n] = self._prune_linear(prefix + n, linears[n], hessian)

        # one forward of the unpruned block gives every Linear's input Hessian (no calibration: none)
        walk_blocks_with_hessians(model, inputs, lambda _prefix, block: linear_groups(block), edit,
                                  desc=f"{self.key} blocks")
        total = sum(f["weights"] for f in layers.values())
        zeros = sum(f["zeros"] for f in layers.values())
        return {"pattern": p.pattern, "target_sparsity": p.target_sparsity, "sparsity": zeros / total,
                "pruned_layers": len(layers), "layers": layers}

    def _prune_linear(self, name: str, linear: torch.nn.Linear, hessian: torch.Tensor | None) -> dict:
        weight = linear.weight.detach().to(torch.float32)
        pruned = self.prune_weight(weight, hessian, f"{name}.weight")
        facts = {"weights": weight.numel(), "zeros": int((pruned == 0).sum()), "sparsity": measured_sparsity(pruned)}
        if hessian is not None:  # beside magnitude pruning at the same pattern, on the same inputs
            magnitude = weight * keep_mask(weight.abs(), self.params, per_row=False, name=name)
            facts["output_mse"] = output_error(weight, pruned, hessian)
            facts["magnitude_output_mse"] = output_error(weight, magnitude, hessian)
        with torch.no_grad():
            linear.weight.copy_(pruned.to(linear.weight.dtype))
        return facts

    @staticmethod
    def _refuse_quantized(model: PreTrainedModel) -> None:
        if getattr(model.config, QUANT_CONFIG_ATTR, None) or getattr(model.config, "quantization_config", None):
            raise PruneError("the model is quantized; prune the full-precision model, then quantize the pruned one")
