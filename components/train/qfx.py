"""QFX: fixed-point quantization-aware training with a learned binary point (Fan et al., 2024,
"QFX: Trainable Fixed-Point Quantization for Deep Learning Acceleration on FPGAs", arXiv 2401.17544).

Each targeted block projection computes with its weight on a signed ``bits``-bit fixed-point
grid with ``f`` fractional bits, the two's-complement grid of ``components.quant.fake_quant.fixed_point``:

    W_q = clamp(round(W * 2^f), -2^(bits-1), 2^(bits-1) - 1) * 2^-f

so every weight is an integer times a power of two, which FPGA datapaths multiply by shifting.
The binary point ``f`` is one number per tensor. QFX's idea is to learn it: here ``f`` is a
continuous parameter and the forward uses ``round(f)`` through a straight-through estimator, so
autograd gives it LSQ's step gradient (``round(W/s) - W/s`` inside the range, the bound outside)
times ``ds/df = -ln 2 * s``. The weights train through the usual clipped straight-through
estimator. ``learn_binary_point: false`` keeps every ``f`` where it started: the static
fixed-point control, the same method with the learning switched off.

Where ``f`` starts (``binary_point``): ``per_layer``, each tensor's integer ``f`` with the least
squared error on the input model's weights; ``global``, one ``f`` for every targeted tensor, the
least summed squared error (a single Q-format for the whole model, as a hand-written fixed-point
design would use).

The binary points train at their own rate (``binary_point_lr``, under the stage's schedule): at
the weights' rate Adam would move ``f`` about ``lr`` per step, and a change of the grid needs 0.5.

What was read and what is a guess: the abstract (the binary point is learned during training, a
differentiable fixed-point emulation, a multiplier-free option limiting the ones in each
weight) [read]; no code was released. The straight-through estimator on ``round(f)``, one ``f`` per
tensor, the MSE start and ``binary_point_lr`` are [guess]. Not implemented: QFX's quantized
activations and its multiplier-free (K-hot) weights.

When training ends every layer is folded to a plain ``nn.Linear`` holding ``W_q``, and ``pack``
writes the integer codes with the scale ``2^-f`` of each tensor (``scheme: fixed_point``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from components.quant.base import PackedWeights, QuantizedModel
from components.quant.fake_quant import round_ste
from components.registry import Paper
from components.train.qat import QatPackError
from components.train.replacement import FoldableLinear, LinearReplacement
from components.train.trainer import TrainConfig

# candidates around the largest f that clips nothing: fewer fractional bits only coarsen the
# grid without clipping less, and more than 8 extra clip nearly every weight of a layer
POINT_CANDIDATES_BELOW, POINT_CANDIDATES_ABOVE = 2, 8


def two_complement_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def on_fixed_point_grid(weight: torch.Tensor, frac_bits: torch.Tensor, bits: int, rounding=torch.round) -> torch.Tensor:
    """``weight`` on the ``bits``-bit grid with ``frac_bits`` fractional bits (a one-element tensor; with
    ``rounding=round_ste`` both receive straight-through gradients)."""
    qmin, qmax = two_complement_range(bits)
    step = torch.pow(2.0, -rounding(frac_bits))
    return torch.clamp(rounding(weight / step), qmin, qmax) * step


def mse_binary_point(weights: list[torch.Tensor], bits: int) -> int:
    """The integer binary point with the least squared error summed over ``weights``."""
    _, qmax = two_complement_range(bits)
    absmax = max(float(w.abs().max()) for w in weights)
    if absmax == 0.0:
        return 0
    no_clipping = math.floor(math.log2(qmax / absmax))
    best, best_error = no_clipping, float("inf")
    for f in range(no_clipping - POINT_CANDIDATES_BELOW, no_clipping + POINT_CANDIDATES_ABOVE + 1):
        point = torch.tensor(float(f))
        error = sum(float(((on_fixed_point_grid(w, point, bits) - w) ** 2).sum()) for w in weights)
        if error < best_error:  # strict: a tie keeps the coarser grid, which clips less
            best, best_error = f, error
    return best


class FixedPointLinear(FoldableLinear):
    """``x W_q^T + bias``; ``weight`` is the fp32 master copy, ``frac_bits`` its binary point."""

    def __init__(self, linear: nn.Linear, bits: int, frac_bits: int, learn: bool):
        super().__init__(linear)
        self.weight = linear.weight
        self.bits = bits
        point = torch.tensor([float(frac_bits)])  # 1-D: DeepSpeed's engine cannot broadcast a 0-d parameter
        if learn:
            self.frac_bits = nn.Parameter(point)
        else:
            self.register_buffer("frac_bits", point)

    def effective_weight(self) -> torch.Tensor:
        return on_fixed_point_grid(self.weight.float(), self.frac_bits, self.bits, rounding=round_ste)


class FixedPointTraining(LinearReplacement):
    key = "qfx"
    quantizes_weights = True
    # ``pack`` reads the binary points ``finalize`` kept; several ranks hand back only the weights
    one_process_only = "packs its codes with the binary points, which only the training process holds"
    paper = Paper(title="QFX: Trainable Fixed-Point Quantization for Deep Learning Acceleration on FPGAs",
                  url="https://arxiv.org/abs/2401.17544", arxiv="2401.17544")

    class Params(LinearReplacement.Params):
        bits: int = Field(8, ge=2, le=8, description="Bits per weight, two's complement.")
        binary_point: Literal["per_layer", "global"] = Field(
            "per_layer", description="Where the binary points start: each tensor's MSE-optimal one, or one "
                                     "MSE-optimal point shared by every targeted tensor.")
        learn_binary_point: bool = Field(True, description="Train the binary points (QFX); false keeps them where "
                                                           "they started (static fixed point).")
        binary_point_lr: float = Field(0.02, gt=0, description="Learning rate of the binary points (AdamW, no decay, "
                                                                "under the stage's schedule).")

        @model_validator(mode="after")
        def _learned_points_need_adamw(self):
            # measured: under SGD (momentum 0.9, lr 0.5, 30 steps) no point moved; Adam's normalised
            # step is what moves a scalar with a small STE gradient
            if self.learn_binary_point and self.optimizer != "adamw":
                raise ValueError(f"learn_binary_point trains the binary points with AdamW at binary_point_lr; "
                                 f"optimizer={self.optimizer!r} is not supported with it (use adamw, or "
                                 "learn_binary_point: false)")
            return self

    def prepare(self, model: nn.Module) -> None:
        p, targets = self.params, self.targets(model)
        weights = {name: linear.weight.detach().float() for name, linear in targets.items()}
        shared = mse_binary_point(list(weights.values()), p.bits) if p.binary_point == "global" else None
        self.initial_points = {name: shared if shared is not None else mse_binary_point([w], p.bits)
                               for name, w in weights.items()}
        point_of = {id(targets[name]): f for name, f in self.initial_points.items()}
        self.replace(model, targets,
                     lambda linear: FixedPointLinear(linear, p.bits, point_of[id(linear)], p.learn_binary_point))

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        if not self.params.learn_binary_point:
            return []  # the points are buffers
        points = [m.frac_bits for m in self.replaced(model).values() if m.frac_bits.requires_grad]
        return [{"params": points, "weight_decay": 0.0, "lr": self.params.binary_point_lr}]

    def points(self, model: nn.Module) -> dict[str, int]:
        return {name: int(torch.round(m.frac_bits.detach())) for name, m in sorted(self.replaced(model).items())}

    def finalize(self, model: nn.Module) -> dict:
        self.final_points = self.points(model)
        drift = max(abs(float(m.frac_bits) - self.initial_points[n]) for n, m in self.replaced(model).items())
        replaced = self.fold_back(model)
        p, points = self.params, self.final_points
        moved = sorted(n for n in points if points[n] != self.initial_points[n])
        return {"bits": p.bits, "bits_per_weight": float(p.bits), "binary_point": p.binary_point,
                "learn_binary_point": p.learn_binary_point, "quantized_layers": len(replaced),
                "frac_bits": points, "frac_bits_mean": sum(points.values()) / len(points),
                "binary_points_moved": len(moved),
                # how far the continuous points went: a grid changes only past 0.5
                "binary_point_drift_max": round(drift, 4)}

    def pack(self, model: nn.Module) -> QuantizedModel:
        """Each tensor's two's-complement codes (stored as ``code + 2^(bits-1)``, the quantize stage's
        format) and its scale ``2^-f``; the returned ``state_dict`` holds exactly what they dequantize to."""
        bits = self.params.bits
        qmin, qmax = two_complement_range(bits)
        store, state = PackedWeights(), {}
        for name, f in sorted(self.final_points.items()):
            weight = model.get_parameter(f"{name}.weight").detach().float()
            scale = 2.0 ** -f
            codes = torch.round(weight / scale)
            restored = codes * scale
            if codes.min() < qmin or codes.max() > qmax or not torch.equal(restored, weight):
                raise QatPackError(f"{name}.weight is not on its {bits}-bit fixed-point grid with {f} fractional bits")
            state[f"{name}.weight"] = restored
            store.add_int(f"{name}.weight", weight.shape, (codes - qmin).to(torch.uint8),
                          torch.tensor([[scale]]), None, bits, "per_tensor", None, True)
        meta = store.meta("fixed_point", bits=bits, granularity="per_tensor", group_size=None, symmetric=True,
                          zero_point=2 ** (bits - 1), frac_bits=self.final_points)
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)
