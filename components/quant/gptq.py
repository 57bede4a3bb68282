"""GPTQ (Frantar et al. 2022) over a whole model: sequential, block by block, layer group by group.

Calibration sequences are run up to block 0 once. Inside each block the Linears are quantized
in forward order, one input-sharing group at a time (q/k/v, then o, then gate/up, then down):
each group's Hessian is collected from inputs that already pass through the quantized earlier
groups, so later layers correct for earlier layers' error (the reference's "true sequential").
The block's quantized outputs then feed the next block. The per-layer solve is
``gptq_solver.gptq_quantize``; weights land in RTN's packed integer format.

Spectra's QuantLM models are this method at 3, 4, 6 and 8 bits.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, PackedWeights, QuantizedModel, Quantizer, check_bits, uniform_int_meta
from components.quant.calibration import (block_linears, capture_block_inputs, check_calibration, decoder_blocks,
                                          linear_groups, linear_input_hooks)
from components.quant.gptq_solver import HessianAccumulator, gptq_quantize
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

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        check_bits(self.key, p.bits)
        self.refuse_if_quantized(model)
        tokens = check_calibration(calibration, self.key)
        targets = {name for name, _ in self.target_linears(model)}
        store = PackedWeights()
        metrics: dict[str, float] = {}
        inputs = capture_block_inputs(model, tokens, p.batch_size)
        blocks = decoder_blocks(model)
        for index, block in enumerate(tqdm(blocks, desc="gptq blocks", unit="block")):
            linears = block_linears(block)
            prefix = f"model.layers.{index}."
            for group in linear_groups(block):
                names = [n for n in group if prefix + n in targets]
                if not names:
                    continue
                hessians = {n: HessianAccumulator(linears[n].in_features, name=prefix + n) for n in names}
                with linear_input_hooks(block, names, lambda n, x: hessians[n].add(x)):
                    inputs.run(block)
                for n in names:
                    name = f"{prefix}{n}.weight"
                    weight = linears[n].weight.detach().to(torch.float32)
                    h = hessians[n].hessian
                    codes, scales, zeros, dequant = gptq_quantize(
                        weight, h, p.bits, p.granularity, p.group_size, p.symmetric, damp=p.damp,
                        block_size=p.block_size, act_order=p.act_order, name=name)
                    metrics[f"output_mse.{prefix}{n}"] = _output_error(weight, dequant, h)
                    rtn_dequant = quantize_tensor(weight, p.bits, p.granularity, p.group_size, p.symmetric, name)[3]
                    metrics[f"rtn_output_mse.{prefix}{n}"] = _output_error(weight, rtn_dequant, h)
                    with torch.no_grad():
                        linears[n].weight.copy_(dequant.to(linears[n].weight.dtype))
                    store.add_int(name, weight.shape, codes, scales, zeros, p.bits, p.granularity, p.group_size,
                                  p.symmetric)
            inputs = inputs.run(block)  # the quantized block's outputs feed the next block
        layers = [k.removeprefix("output_mse.") for k in metrics if k.startswith("output_mse.")]
        metrics["layers_better_than_rtn"] = sum(
            metrics[f"output_mse.{n}"] <= metrics[f"rtn_output_mse.{n}"] for n in layers)
        metrics["layers_quantized"] = len(layers)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        meta = store.meta("gptq", **uniform_int_meta(p), act_order=p.act_order, metrics=metrics)
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)


def _output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ``||X Wᵀ - X Qᵀ||² / (n·out)`` from ``H = (2/n) XᵀX``."""
    delta = (weight - quantized).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", delta, hessian, delta) / (2 * weight.shape[0]))
