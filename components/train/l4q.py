"""L4Q: LoRA fine-tuning through a learned low-bit grid, merged into a W<bits> model (Jeon et al.,
2024, arXiv 2402.04902).

Each targeted block projection keeps its pretrained weight ``W0`` frozen and trains a LoRA update
and the quantizer together: the forward uses

    W' = W0 + (alpha / rank) B A,    Wq = clamp(round((W' - b) / s), Qn, Qp) * s + b

with one learned step ``s`` and offset ``b`` per group of ``group_size`` inputs of each output
row, ``[Qn, Qp] = [-2^(bits-1), 2^(bits-1) - 1]``. Gradients are LSQ's, obtained by autograd
through a straight-through round: ``W'`` (so A and B) gets the gradient where its code is inside
the grid, ``s`` gets ``round(v) - v`` inside and the bound outside (scaled by LSQ's
``1 / sqrt(group_size * Qp)``), ``b`` gets it where the code saturates. ``s`` starts at LSQ's
``2 mean|W0| / sqrt(Qp)`` per group and ``b`` at 0 [read: a third-party ``L4Quantizer`` and the
paper's two-step note "warm up Q(W) + AB, then quantize(W + sAB)"; this implements the second,
quantize-after-merge form from the first step, with no warm-up phase]. A and B are LoRA's
(Kaiming A, zero B), so training starts from the quantized pretrained model.

When training ends every layer is folded to a plain ``nn.Linear`` holding ``Wq``: the merged
model is exactly on the learned grid, and ``pack`` writes its integer codes, steps and zero
points (``(code - zero) * scale``, the quantize stage's format) with their real byte size.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from components.quant.base import PackedWeights, QuantizedModel
from components.quant.fake_quant import grad_scale, round_ste
from components.registry import Paper
from components.train.qat import QatPackError
from components.train.replacement import FoldableLinear, LinearReplacement


class LsqLoraLinear(FoldableLinear):
    """``x Wq^T + bias`` with ``Wq`` the learned-grid quantization of ``W0 + (alpha/rank) B A``."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, bits: int, group_size: int):
        super().__init__(linear)
        self.weight = linear.weight.requires_grad_(False)  # W0: frozen, saved with the model
        device, dtype = self.weight.device, self.weight.dtype
        self.scale, self.group_size = alpha / rank, group_size
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        groups = self.weight.detach().reshape(self.out_features, -1, group_size)
        # 1-D so the trainer's decoupled weight decay (matrices only) does not shrink the grid
        self.step = nn.Parameter((2 * groups.abs().mean(-1) / math.sqrt(self.qmax)).reshape(-1))
        self.offset = nn.Parameter(torch.zeros_like(self.step))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, offset), one per group, shaped [out, n_groups, 1] to broadcast over a group."""
        shape = (self.out_features, self.in_features // self.group_size, 1)
        return self.step.reshape(shape), self.offset.reshape(shape)

    def effective_weight(self) -> torch.Tensor:
        merged = self.weight + self.scale * (self.lora_B @ self.lora_A)
        step, offset = self.grid()
        step = grad_scale(step, 1.0 / math.sqrt(self.group_size * self.qmax))
        v = (merged.reshape(self.out_features, -1, self.group_size) - offset) / step
        codes = torch.clamp(round_ste(v), self.qmin, self.qmax)
        return (codes * step + offset).reshape(merged.shape)


class L4QTraining(LinearReplacement):
    key = "l4q"
    quantizes_weights = True
    # ``pack`` reads the learned grids ``finalize`` kept; several ranks hand back only the weights
    one_process_only = "packs its merged weights from the learned grids, which only the training process holds"
    paper = Paper(title="L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models",
                  url="https://arxiv.org/abs/2402.04902", arxiv="2402.04902")

    class Params(LinearReplacement.Params):
        rank: int = Field(8, ge=1, description="Rank r of each LoRA update B @ A.")
        alpha: float = Field(16.0, gt=0, description="The update is scaled by alpha / rank.")
        bits: int = Field(4, ge=2, le=8, description="Bits per weight code of the merged model.")
        group_size: int = Field(64, gt=0, description="Input weights per learned step and offset.")

        @model_validator(mode="after")
        def _adapters_only(self):
            if self.freeze:
                raise ValueError("params.freeze: l4q already trains only the adapters and the grids")
            return self

    def prepare(self, model: nn.Module) -> None:
        p, targets = self.params, self.targets(model)
        self.check_groups_divide(targets, p.group_size)
        for name, linear in sorted(targets.items()):
            if p.rank > min(linear.in_features, linear.out_features):
                raise ValueError(f"params.rank={p.rank} is larger than layer {name} allows "
                                 f"(min(in, out) = {min(linear.in_features, linear.out_features)})")
        model.requires_grad_(False)  # only the adapters and the grids train
        self.replace(model, targets, lambda linear: LsqLoraLinear(linear, p.rank, p.alpha, p.bits, p.group_size))

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        self.grids = {name: tuple(t.detach().clone() for t in module.grid()) for name, module in replaced.items()}
        p = self.params
        adapter_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in replaced.values())
        return {"lora_rank": p.rank, "lora_alpha": p.alpha, "lora_params": adapter_params, "weight_bits": p.bits,
                "weight_group_size": p.group_size, "quantized_layers": len(replaced)}

    def pack(self, model: nn.Module) -> QuantizedModel:
        """Codes ``q - Qn`` in [0, 2^bits) with zero point ``-Qn - b/s``: ``(code - zero) * s`` is
        the merged weight ``q s + b`` (to an ulp; the returned ``state_dict`` holds exactly what
        the packed file dequantizes to)."""
        p = self.params
        qmin = -(2 ** (p.bits - 1))
        store, state = PackedWeights(), {}
        for name, (step, offset) in sorted(self.grids.items()):
            weight = model.get_parameter(f"{name}.weight").detach().float()
            grouped = weight.reshape(step.shape[0], step.shape[1], -1)
            codes = torch.round((grouped - offset) / step) - qmin
            if codes.min() < 0 or codes.max() > 2 ** p.bits - 1:
                raise QatPackError(f"{name}.weight is not on its learned {p.bits}-bit grid")
            scales, zeros = step.squeeze(-1), (-qmin - offset / step).squeeze(-1)
            dequantized = ((codes - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(weight.shape)
            if not torch.allclose(dequantized, weight, rtol=1e-5, atol=1e-7):
                raise QatPackError(f"{name}.weight is not on its learned {p.bits}-bit grid (max difference "
                                   f"{float((dequantized - weight).abs().max()):.3g})")
            state[f"{name}.weight"] = dequantized
            store.add_int(f"{name}.weight", weight.shape, codes.to(torch.uint8).reshape(weight.shape), scales, zeros,
                          p.bits, "group", p.group_size, False)
        meta = store.meta("l4q", bits=p.bits, granularity="group", group_size=p.group_size, symmetric=False)
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)
