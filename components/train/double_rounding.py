"""Double Rounding: one model trained jointly for several bit widths and stored as its highest-width
integer codes, from which every lower width is switched without full-precision weights
(Huang et al., 2025, "Nearly Lossless Adaptive Bit Switching", arXiv 2502.01199).

Each targeted block projection keeps an fp32 master weight ``W`` and one learned step ``s`` per
output channel. At the highest width ``h`` (8 in the paper) the forward pass uses

    q_h = clamp(round(W / s), -(2^(h-1) - 1), 2^(h-1) - 1),    W_h = q_h * s          (first rounding)

and at a lower width ``b`` it re-rounds those integers with the one shared step

    q_b = clamp(round(q_h / 2^(h-b)), -(2^(b-1) - 1), 2^(b-1) - 1),    W_b = q_b * 2^(h-b) * s

(``components.quant.bit_switch.double_round``, the function the ``bit_switch`` quantize method
applies to the stored codes, so a switched model is exactly the one trained at that width).
Gradients are LSQ's, by autograd through straight-through rounds, with LSQ's
``1 / sqrt(in_features * Qp_h)`` scale on the step; ``s`` starts, per channel, at the step that
minimizes the weight's squared error summed over the trained widths (``initial_step``).

Joint training: every step runs the batch once at each width of ``bit_widths`` and minimizes the
mean of their losses. Adaptive learning-rate scaling (ALRS, ``alrs: true``): the gradient the
shared step receives from width ``b`` carries the rounding error of a grid ``2^(h-b)`` times coarser,
so low widths would dominate the step's update ("competitive interference", the paper's term); each
width's gradient on the step is multiplied by ``2^-(h-b)`` before they are summed. ALRS acts on the
steps only, as in the paper.

What was read and what is a guess: the paper's abstract and the official README
(haiduo/Double-Rounding: "unified representation, normalized learning steps", the highest integer
precision stored instead of full precision, ``-bit_width_list='8,6,4,2'``, starting from a trained
fp32 model) [read]; OpenReview's summary that ALRS scales the learning rates of the quantization
scales only [read]. The equations above, the symmetric grids and the fixed ``2^-(h-b)`` ratio are
[guess]: the repository's code could not be read here, and the paper's ALRS adapts its rates during
training rather than using a fixed ratio. The paper's Hessian-aware stochastic bit switching (mixed
precision) is not implemented.

When training ends every layer is folded to a plain ``nn.Linear`` holding ``W_h``, and ``pack`` writes
the ``h``-bit codes and steps (``scheme: double_rounding``), which ``bit_switch`` reads.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch import nn

from components.quant.base import PackedWeights, QuantizedModel
from components.quant.bit_switch import DOUBLE_ROUNDING_PAPER, STORED_SCHEME, double_round
from components.quant.fake_quant import grad_scale, int_range, round_ste
from components.train.qat import QatPackError
from components.train.replacement import FoldableLinear, LinearReplacement


def dequantized(weight: torch.Tensor, step: torch.Tensor, stored_bits: int, bits: int, rounding=torch.round):
    """``weight`` on the ``bits``-wide grid switched from the stored one of per-row ``step``."""
    qmin, qmax = int_range(stored_bits, symmetric=True)
    step = step.unsqueeze(1)
    codes = torch.clamp(rounding(weight / step), qmin, qmax)
    return double_round(codes, stored_bits, bits, rounding) * (2 ** (stored_bits - bits) * step)


def initial_step(weight: torch.Tensor, stored_bits: int, widths: tuple[int, ...]) -> torch.Tensor:
    """Each row's step minimizing the weight's squared error summed over ``widths``, searched over
    the fractions 2/40, 3/40 ... 60/40 of the min-max step ``max|w| / Qp``. One rule for every
    setting: with one width it is that width's MSE-optimal step; jointly, it balances the widths
    (the min-max step of 8 bits zeroes most weights at 2 bits). Our choice: how the paper starts
    its steps from the fp32 model was not read."""
    _, qmax = int_range(stored_bits, symmetric=True)
    amax = weight.abs().amax(1).clamp_min(torch.finfo(weight.dtype).tiny) / qmax
    best_step, best_error = amax.clone(), torch.full_like(amax, float("inf"))
    for fraction in (i / 40 for i in range(2, 61)):  # min-max itself (40/40) is a candidate
        step = amax * fraction
        error = sum(((dequantized(weight, step, stored_bits, b) - weight) ** 2).sum(1) for b in widths)
        better = error < best_error
        best_step, best_error = torch.where(better, step, best_step), torch.where(better, error, best_error)
    return best_step


class DoubleRoundingLinear(FoldableLinear):
    """``x W_b^T + bias`` at the width ``bits`` currently set; ``weight`` is the fp32 master copy."""

    def __init__(self, linear: nn.Linear, stored_bits: int, step_grad_weights: dict[int, float]):
        super().__init__(linear)
        self.weight = linear.weight
        self.stored_bits = self.bits = stored_bits
        self.step_grad_weights = step_grad_weights  # width -> ALRS factor on the step's gradient
        _, qmax = int_range(stored_bits, symmetric=True)
        self.lsq_scale = 1.0 / math.sqrt(self.in_features * qmax)
        # 1-D so the trainer's decoupled weight decay (matrices only) does not shrink the grid
        self.step = nn.Parameter(initial_step(linear.weight.detach(), stored_bits, tuple(step_grad_weights)))

    def effective_weight(self) -> torch.Tensor:
        step = grad_scale(self.step, self.lsq_scale * self.step_grad_weights[self.bits])
        return dequantized(self.weight, step, self.stored_bits, self.bits, rounding=round_ste)


class DoubleRounding(LinearReplacement):
    key = "double_rounding"
    quantizes_weights = True
    # ``pack`` reads the learned steps ``finalize`` kept; several ranks hand back only the weights
    one_process_only = "packs its codes with the learned steps, which only the training process holds"
    paper = DOUBLE_ROUNDING_PAPER

    class Params(LinearReplacement.Params):
        bit_widths: tuple[int, ...] = Field((8, 6, 4, 2), min_length=1, description=(
            "Widths trained jointly (every step runs the batch at each); the highest is the one stored, "
            "the others are switched from it by `bit_switch`. One width: plain LSQ training at that width."))
        alrs: bool = Field(True, description="Adaptive learning-rate scaling: each width's gradient on the shared "
                                             "step is multiplied by 2^-(highest - width).")

        @field_validator("bit_widths")
        @classmethod
        def _distinct_widths(cls, widths):
            if len(set(widths)) != len(widths):
                raise ValueError(f"bit_widths {list(widths)} repeats a width")
            if any(not 2 <= b <= 8 for b in widths):
                raise ValueError(f"bit_widths {list(widths)}: every width must be 2..8 bits")
            return tuple(sorted(widths, reverse=True))

    @property
    def stored_bits(self) -> int:
        return self.params.bit_widths[0]

    def step_grad_weights(self) -> dict[int, float]:
        h = self.stored_bits
        return {b: 2.0 ** -(h - b) if self.params.alrs else 1.0 for b in self.params.bit_widths}

    def prepare(self, model: nn.Module) -> None:
        weights = self.step_grad_weights()
        self.replace(model, self.targets(model), lambda linear: DoubleRoundingLinear(linear, self.stored_bits, weights))

    def set_width(self, model: nn.Module, bits: int) -> None:
        for module in self.replaced(model).values():
            module.bits = bits

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        """The mean over ``bit_widths`` of the causal LM loss at each width (highest width last, so a
        forward pass outside ``loss``, e.g. the validation monitor's, runs at the stored width)."""
        losses = []
        for bits in reversed(self.params.bit_widths):
            self.set_width(model, bits)
            losses.append(super().loss(model, batch, teacher))
        return torch.stack(losses).mean()

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """One forward and backward per width."""
        return len(self.params.bit_widths) * super().flops_per_token(model, seq_len, teacher)

    def finalize(self, model: nn.Module) -> dict:
        self.set_width(model, self.stored_bits)
        replaced = self.fold_back(model)
        self.steps = {name: module.step.detach().clone() for name, module in replaced.items()}
        p = self.params
        return {"bit_widths": list(p.bit_widths), "stored_bits": self.stored_bits, "alrs": p.alrs,
                "quantized_layers": len(replaced)}

    def pack(self, model: nn.Module) -> QuantizedModel:
        """The stored width's codes ``q_h + 2^(h-1)`` and each channel's step (``(code - zero) * step``,
        the quantize stage's format); the returned ``state_dict`` holds exactly what they dequantize to."""
        bits = self.stored_bits
        qmin, qmax = int_range(bits, symmetric=True)
        store, state = PackedWeights(), {}
        for name, step in sorted(self.steps.items()):
            weight = model.get_parameter(f"{name}.weight").detach().float()
            codes = torch.round(weight / step.unsqueeze(1))
            restored = codes * step.unsqueeze(1)
            if codes.min() < qmin or codes.max() > qmax or not torch.allclose(restored, weight, rtol=1e-6, atol=0):
                raise QatPackError(f"{name}.weight is not on its learned {bits}-bit grid")
            state[f"{name}.weight"] = restored
            store.add_int(f"{name}.weight", weight.shape, (codes + 2 ** (bits - 1)).to(torch.uint8),
                          step.reshape(-1, 1), None, bits, "per_channel", None, True)
        meta = store.meta(STORED_SCHEME, bits=bits, bit_widths=list(self.params.bit_widths), granularity="per_channel",
                          group_size=None, symmetric=True, zero_point=2 ** (bits - 1))
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)
