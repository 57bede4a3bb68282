"""GPTQ (Frantar et al. 2022) over a whole model, sequentially block by block.

Calibration sequences are run up to block 0 once. For each block, one forward collects the
Hessian ``2/n XᵀX`` of every input-sharing Linear group (q/k/v share one, gate/up another), the
block's Linears are solved with ``gptq_solver.gptq_quantize``, and the quantized block's outputs
feed the next block, so later blocks see earlier blocks' quantization error. This is the
reference implementation's and llm-compressor's default; ``true_sequential`` also quantizes
the groups inside a block in forward order, recollecting each group's Hessian through the
already-quantized earlier groups (one block forward per group). Weights land in RTN's packed
integer format. Spectra's QuantLM models are this method at 3, 4, 6 and 8 bits.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, PackedWeights, QuantizedModel, Quantizer, check_bits, uniform_int_meta
from components.quant.calibration import (capture_block_inputs, check_calibration, targeted_groups,
                                          walk_blocks_with_hessians)
from components.quant.gptq_solver import gptq_quantize, output_error
from components.quant.rtn import quantize_tensor
from components.registry import Paper


class GptqQuantizer(Quantizer):
    key = "gptq"
    paper = Paper(
        title="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
        url="https://arxiv.org/abs/2210.17323",
        arxiv="2210.17323",
    )
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 6, 8] = Field(4, description="bits per weight code (Spectra QuantLMs: 3/4/6/8)")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field("group", description="scale granularity")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric grid (no stored zero points)")
        damp: float = Field(0.01, gt=0, description="Hessian damping, a fraction of mean(diag H)")
        block_size: int = Field(128, gt=0, description="columns per lazy-batch update block")
        act_order: bool = Field(False, description="visit columns by descending Hessian diagonal")
        batch_size: int = Field(8, gt=0, description="calibration sequences per forward pass")
        true_sequential: bool = Field(
            False, description="collect each input-sharing group's Hessian after the earlier groups of its block "
                               "are quantized (one block forward per group instead of one per block)")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        check_bits(self.key, p.bits)
        self.refuse_if_quantized(model)
        tokens = check_calibration(calibration, self.key)
        targets = {name for name, _ in self.target_linears(model)}
        store = PackedWeights()
        metrics: dict[str, float] = {}
        inputs = capture_block_inputs(model, tokens, p.batch_size)


        def edit(prefix: str, linears: dict, group: list[str], hessian: torch.Tensor) -> None:
            for n in group:
                self._quantize_linear(f"{prefix}{n}", linears[n], hessian, store, metrics)

        # Without true_sequential every group's Hessian comes from one forward of the block before
        # any of it is quantized (the reference's and llm-compressor's default); with it, each
        # group's inputs pass through the already-quantized earlier groups.
        walk_blocks_with_hessians(model, inputs, targeted_groups(targets), edit, sequential=p.true_sequential, desc="gptq blocks")
        layers = [k.removeprefix("output_mse.") for k in metrics if k.startswith("output_mse.")]
        metrics["layers_better_than_rtn"] = sum(
            metrics[f"output_mse.{n}"] <= metrics[f"rtn_output_mse.{n}"] for n in layers)
        metrics["layers_quantized"] = len(layers)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        meta = store.meta("gptq", **uniform_int_meta(p), act_order=p.act_order, metrics=metrics)
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)

    def _quantize_linear(self, module_name: str, linear: torch.nn.Linear, hessian: torch.Tensor,
                         store: PackedWeights, metrics: dict[str, float]) -> None:
        """GPTQ one Linear in place; record its output error next to RTN's on the same inputs."""
        p = self.params
        name = f"{module_name}.weight"
        weight = linear.weight.detach().to(torch.float32)
        codes, scales, zeros, dequant = gptq_quantize(
            weight, hessian, p.bits, p.granularity, p.group_size, p.symmetric, damp=p.damp,
            block_size=p.block_size, act_order=p.act_order, name=name)
        rtn_dequant = quantize_tensor(weight, p.bits, p.granularity, p.group_size, p.symmetric, name)[3]
        metrics[f"output_mse.{module_name}"] = output_error(weight, dequant, hessian)
        metrics[f"rtn_output_mse.{module_name}"] = output_error(weight, rtn_dequant, hessian)
        with torch.no_grad():
            linear.weight.copy_(dequant.to(linear.weight.dtype))
        store.add_int(name, weight.shape, codes, scales, zeros, p.bits, p.granularity, p.group_size, p.symmetric)

