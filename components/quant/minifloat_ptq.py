"""Minifloat vs integer post-training quantization (Aggarwal et al., AMD, arXiv 2311.12359).

Weights are stored on a scaled minifloat grid: each output row (``per_channel``) or each
``group_size`` consecutive inputs of a row (``group``) share one scale, and every weight is a
``1 + E + M``-bit minifloat code (any ``eXmY`` with 3 to 8 bits; OCP E4M3, IEEE-style E5M2, MX
E2M1/E3M2/E2M3 presets, and for any other ``eXmY`` an all-finite saturating format with the
default bias, see ``minifloat.from_name``). Storage (``PackedWeights.add_codes``):

- ``<name>.qweight``: the minifloat codes (sign | exponent | mantissa), bit-packed at the format's
  width;
- ``scale_kind="float"``: ``<name>.scales`` fp16 ``[rows, groups]``, ``absmax / fmt.max_value``
  rounded *up* to fp16 (so no weight saturates) and floored at fp16's smallest normal (formats
  with a huge range, e.g. E5M2, would otherwise need subnormal fp16 scales; a larger scale only
  leaves some top binades unused);
- ``scale_kind="pow2"``: ``<name>.scale_exponents`` uint8 ``[rows, groups]``: an OCP-MX E8M0
  exponent ``e + 127``, scale ``2**e`` with ``e = floor(log2 absmax) - emax``; the largest
  weights may saturate, as in MX.

A weight is ``decode(code) * scale``; ``dequantize_minifloat`` rebuilds it from the packed
tensors and ``meta["tensors"][name]``, bit-exactly equal to the state dict.

Rounding onto the fixed grid (scales from the original weight):

- ``rtn``: nearest grid value (round-to-nearest-even in the format);
- ``gptq``: GPTQ's error feedback (``gptq_solver.gptq_with_grid``), sequentially through the
  blocks with Hessians from the already-quantized model's inputs, as ``gptq.py``;
- ``learned``: AdaRound on the non-uniform grid: each weight chooses between its two neighbouring
  grid values ``lo <= w/s <= hi`` through ``lo + h(V) * (hi - lo)`` (rectified sigmoid h, the
  annealed rounding regulariser of ``adaround.py``), optimised layer by layer on the colleague's
  reconstruction engine (``reconstruction.reconstruct``, mode ``layer``, quantized input stream).

``activation_format`` (``"int8"``, ``"e4m3"``, ...) adds a dynamic activation quantizer on every
targeted Linear's input (``meta["activations"]``, applied by the evaluate stage). Weights are
calibrated with full-precision activations (the paper's weight and activation formats are
independent sweep axes).

``minifloat_vs_int_grid`` runs the paper's sweep on one model: for each bit width, INT vs the best
``(E, M)`` split, weight MSE and perplexity.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator
from transformers import PreTrainedModel

from components.quant.activation import ActivationSpec
from components.quant.adaround import AdaRoundWeight, inverse_rectified_sigmoid, rectified_sigmoid
from components.quant.base import (CalibratedParams, PackedWeights, QuantizationError, QuantizedModel, Quantizer)
from components.quant.calibration import (capture_block_inputs, check_calibration, swapped_weights,
                                          targeted_groups, walk_blocks_with_hessians)
from components.quant.gptq_solver import gptq_quantize, gptq_with_grid, output_error
from components.quant.minifloat import MinifloatFormat, decode, encode, from_name, round_to_format
from components.quant.reconstruction import IntGrid, ReconstructionConfig, reconstruct
from components.quant.rtn import quantize_tensor
from components.registry import Paper

MIN_FORMAT_BITS, MAX_FORMAT_BITS = 3, 8
FP16_MAX = float(torch.finfo(torch.float16).max)
FP16_TINY = float(torch.finfo(torch.float16).tiny)
E8M0_BIAS = 127
ROUNDINGS = ("rtn", "gptq", "learned")

# (codes uint8 [out, in], side tensors {key: tensor}, dequantized fp32 [out, in])
Encoded = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- formats


def weight_format(name: str) -> MinifloatFormat:
    """The minifloat format ``name`` names, checked to have 3 to 8 bits (1 sign + E + M)."""
    if not isinstance(name, str):
        raise QuantizationError(f"minifloat format must be a name such as 'e2m1', got {name!r}")
    try:
        fmt = from_name(name)
    except ValueError as e:
        raise QuantizationError(f"minifloat format {name!r}: {e}") from None
    if not MIN_FORMAT_BITS <= fmt.bits <= MAX_FORMAT_BITS:
        raise QuantizationError(
            f"minifloat format {name!r} has {fmt.bits} bits (1 sign + {fmt.exp_bits} exponent + "
            f"{fmt.man_bits} mantissa); supported: {MIN_FORMAT_BITS} to {MAX_FORMAT_BITS} bits")
    return fmt


def format_splits(bits: int) -> list[str]:
    """Every ``eXmY`` name with ``1 + X + Y == bits`` and X >= 1, fewest exponent bits first."""
    return [f"e{e}m{bits - 1 - e}" for e in range(1, bits)]


def activation_spec(activation_format: str | None, modules: Sequence[str],
                    granularity: str = "per_token") -> ActivationSpec | None:
    """``None`` (weight-only), ``"intN"`` (N in 2..16) or a minifloat name -> ActivationSpec."""
    if activation_format is None:
        return None
    match = re.fullmatch(r"int(\d+)", activation_format.strip().lower())
    if match:
        return ActivationSpec(bits=int(match[1]), modules=tuple(modules), granularity=granularity,
                              symmetric=True, format="int")
    try:
        fmt = from_name(activation_format)
    except ValueError as e:
        raise QuantizationError(f"activation_format {activation_format!r}: expected 'intN' or a minifloat "
                                f"name; {e}") from None
    return ActivationSpec(bits=fmt.bits, modules=tuple(modules), granularity=granularity, format=fmt.name)


def format_info(fmt: MinifloatFormat) -> dict:
    """The fields that rebuild ``fmt`` (stored per tensor in ``meta["tensors"]``)."""
    return dict(format=fmt.name, exp_bits=fmt.exp_bits, man_bits=fmt.man_bits, bias=fmt.bias,
                has_inf=fmt.has_inf, nan_encoding=fmt.nan_encoding, saturate=fmt.saturate)


# --------------------------------------------------------------------------- the scaled grid


@dataclass(frozen=True)
class MinifloatGrid:
    """A minifloat format with one scale per row (``per_channel``) or per row group (``group``)."""

    fmt: MinifloatFormat
    granularity: str = "per_channel"
    group_size: int = 128
    scale_kind: str = "float"

    def check(self, weight: torch.Tensor, name: str = "weight") -> None:
        if weight.dim() != 2:
            raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if self.granularity not in ("per_channel", "group"):
            raise QuantizationError(f"{name}: unknown scale granularity {self.granularity!r}; "
                                    "expected 'per_channel' or 'group'")
        if self.scale_kind not in ("float", "pow2"):
            raise QuantizationError(f"{name}: scale_kind must be 'float' or 'pow2', got {self.scale_kind!r}")
        if self.granularity == "group" and (self.group_size <= 0 or weight.shape[1] % self.group_size):
            raise QuantizationError(
                f"{name}: group_size={self.group_size} does not divide its input width {weight.shape[1]}; "
                "choose a group_size that divides every targeted layer's in_features")
        if not torch.isfinite(weight).all():
            raise QuantizationError(f"{name}: weight contains non-finite values; cannot quantize")

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def side_key(self) -> str:
        """The one side tensor stored per weight."""
        return "scales" if self.scale_kind == "float" else "scale_exponents"

    def _view(self, weight: torch.Tensor) -> torch.Tensor:
        out_features, in_features = weight.shape
        size = in_features if self.granularity == "per_channel" else self.group_size
        return weight.reshape(out_features, in_features // size, size)

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """``[rows, groups]`` -> broadcastable to ``[out, in]``."""
        if self.granularity == "per_channel":
            return per_group
        return per_group.repeat_interleave(self.group_size, dim=1)

    def fit(self, weight: torch.Tensor, name: str = "weight") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Stored side tensors and the fp32 scale ``[rows, groups]`` they represent."""
        self.check(weight, name)
        amax = self._view(weight.detach().float()).abs().amax(-1)
        if self.scale_kind == "float":
            scale = (amax / self.fmt.max_value).clamp(min=FP16_TINY)
            if scale.max() > FP16_MAX:
                raise QuantizationError(f"{name}: weight range too large for fp16 scales")
            scale16 = scale.to(torch.float16)
            scale16 = torch.where(scale16.float() < scale,
                                  torch.nextafter(scale16, torch.full_like(scale16, math.inf)), scale16)
            return {"scales": scale16}, scale16.float()
        _, e = torch.frexp(amax)
        exp = torch.where(amax == 0, torch.zeros_like(e), e - 1 - self.fmt.emax).clamp(-E8M0_BIAS, E8M0_BIAS)
        return {"scale_exponents": (exp + E8M0_BIAS).to(torch.uint8)}, torch.ldexp(torch.ones_like(amax), exp)

    def round_scaled(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest grid value of already-scaled values (saturating at ±max)."""
        m = self.fmt.max_value
        return round_to_format(v.clamp(-m, m), self.fmt)

    def encode(self, grid_values: torch.Tensor, side: dict[str, torch.Tensor], scale: torch.Tensor) -> Encoded:
        """On-grid scaled values ``[out, in]`` -> (codes, side tensors, dequant = decode(codes)·scale)."""
        codes = encode(grid_values, self.fmt)
        dequant = decode(codes, self.fmt) * self.expand(scale)
        return codes, side, dequant

    def rtn(self, weight: torch.Tensor, name: str = "weight") -> Encoded:
        side, scale = self.fit(weight, name)
        return self.encode(self.round_scaled(weight.detach().float() / self.expand(scale)), side, scale)

    def values(self) -> torch.Tensor:
        """The format's finite values, sorted (±0 merged)."""
        v = decode(torch.arange(2**self.bits), self.fmt)
        return torch.unique(v[torch.isfinite(v)])

    def info(self) -> dict:
        return dict(**format_info(self.fmt), scale_granularity=self.granularity,
                    group_size=self.group_size if self.granularity == "group" else None, scale_kind=self.scale_kind)


def dequantize_minifloat(packed: dict[str, torch.Tensor], name: str, info: dict) -> torch.Tensor:
    """Rebuild ``name`` from its packed minifloat codes and scales; ``info`` = ``meta["tensors"][name]``."""
    from components.quant.packing import unpack_int

    fmt = MinifloatFormat(info["exp_bits"], info["man_bits"], info["bias"], has_inf=info["has_inf"],
                          nan_encoding=info["nan_encoding"], saturate=info["saturate"], name=info["format"])
    shape = tuple(info["shape"])
    codes = unpack_int(packed[f"{name}.qweight"], fmt.bits, shape[0] * shape[1]).reshape(shape)
    if info["scale_kind"] == "float":
        scale = packed[f"{name}.scales"].float()
    else:
        exp = packed[f"{name}.scale_exponents"].to(torch.int32) - E8M0_BIAS
        scale = torch.ldexp(torch.ones(exp.shape), exp)
    if info["scale_granularity"] == "group":
        scale = scale.repeat_interleave(info["group_size"], dim=1)
    return decode(codes, fmt) * scale


# --------------------------------------------------------------------------- per-layer solvers


def gptq_minifloat(weight: torch.Tensor, hessian: torch.Tensor, grid: MinifloatGrid, *, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False, name: str = "weight") -> Encoded:
    """GPTQ over the scaled minifloat grid (scales fixed from the original weight)."""
    side, scale = grid.fit(weight, name)
    full_scale = grid.expand(scale).expand(weight.shape).contiguous()
    chosen = torch.empty(weight.shape, dtype=torch.float32)

    def round_column(w: torch.Tensor, col: int) -> torch.Tensor:
        s = full_scale[:, col]
        r = grid.round_scaled(w / s)
        chosen[:, col] = r
        return r * s

    gptq_with_grid(weight, hessian, round_column, damp=damp, block_size=block_size, act_order=act_order, name=name)
    return grid.encode(chosen, side, scale)


class MinifloatAdaRound:
    """AdaRound's learnable up/down rounding on a non-uniform (scaled minifloat) grid.

    ``W~ = s * (lo + h(V) * (hi - lo))`` where ``lo``/``hi`` are the grid values just below/above
    ``W/s``; V starts where the soft weight equals W; hard rounding picks ``hi`` where h >= 0.5.
    The regulariser and its β annealing are AdaRound's (``adaround.AdaRoundWeight``)."""

    def __init__(self, weight: torch.Tensor, grid: MinifloatGrid, iters: int, reg_lambda: float = 0.01,
                 beta_range: tuple[float, float] = (20.0, 2.0), warm_start: float = 0.2, name: str = "weight"):
        weight = weight.detach().float()
        self.grid, self.name, self.shape = grid, name, weight.shape
        self.side, self.scale = grid.fit(weight, name)
        self.full_scale = grid.expand(self.scale)
        m = grid.fmt.max_value
        v = (weight / self.full_scale).clamp(-m, m)
        table = grid.values()
        lo_i = (torch.searchsorted(table, v, right=True) - 1).clamp(0, len(table) - 1)
        hi_i = torch.searchsorted(table, v, right=False).clamp(0, len(table) - 1)
        self.lo, hi = table[lo_i], table[hi_i]
        self.gap = hi - self.lo
        frac = torch.where(self.gap > 0, (v - self.lo) / torch.where(self.gap > 0, self.gap, 1.0), 0.0)
        self.V = torch.nn.Parameter(inverse_rectified_sigmoid(frac.clamp(0, 1 - 1e-6)))
        self.iters, self.reg_lambda = iters, reg_lambda
        self.beta_range, self.warm_start = beta_range, warm_start

    def parameters(self):
        return [self.V]

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V)

    def fake_weight(self) -> torch.Tensor:
        return (self.lo + self.h() * self.gap) * self.full_scale

    beta = AdaRoundWeight.beta  # the same warm start and cosine β annealing (uses iters, beta_range, warm_start)

    def regularization(self, step: int):
        beta = self.beta(step)
        if beta is None:
            return 0.0
        return self.reg_lambda * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def finalize(self):
        with torch.no_grad():
            chosen = torch.where(self.h() >= 0.5, self.lo + self.gap, self.lo)
            codes, side, dequant = self.grid.encode(chosen, self.side, self.scale)
            return codes, side[self.grid.side_key], None, dequant


# --------------------------------------------------------------------------- whole-model drivers


def sequential_hessian_solve(model: PreTrainedModel, tokens: torch.Tensor, targets: Iterable[str],
                             solve: Callable[[str, torch.Tensor, torch.Tensor], Encoded],
                             batch_size: int = 8) -> tuple[dict[str, Encoded], dict[str, float]]:
    """GPTQ's sequential walk (``gptq.py``): per block, per input-sharing group, Hessians of the
    inputs through the already-quantized layers, then ``solve(weight name, W, H)``.

    The model's weights are restored afterwards. Returns ``{weight name: Encoded}`` and per-layer
    output errors (``output_mse.<module>``)."""
    targets = set(targets)
    modules = dict(model.named_modules())
    results: dict[str, Encoded] = {}
    metrics: dict[str, float] = {}
    saved = {n: modules[n].weight.data.clone() for n in targets}
    try:

        def edit(prefix: str, linears: dict, group: list[str], hessian: torch.Tensor) -> None:
            for n in group:
                weight = linears[n].weight.detach().float().clone()
                encoded = solve(f"{prefix}{n}.weight", weight, hessian)
                results[f"{prefix}{n}.weight"] = encoded
                metrics[f"output_mse.{prefix}{n}"] = output_error(weight, encoded[2], hessian)
                with torch.no_grad():
                    linears[n].weight.copy_(encoded[2].to(linears[n].weight.dtype))

        walk_blocks_with_hessians(model, capture_block_inputs(model, tokens, batch_size), targeted_groups(targets), edit,
                                  sequential=True, dtype=torch.float64)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.data.copy_(w)
    return results, metrics


@dataclass(frozen=True)
class RoundingConfig:
    """Calibrated-rounding knobs shared by the quantizer and the grid study."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    batch_size: int = 8
    iters: int = 200
    lr: float = 1e-2
    reg_lambda: float = 0.01
    seed: int = 0


def quantize_weights(model: PreTrainedModel, tokens: torch.Tensor | None, modules: Sequence[str],
                     grid: MinifloatGrid | IntGrid, rounding: str, cfg: RoundingConfig = RoundingConfig(),
                     method: str = "minifloat_ptq") -> tuple[dict[str, Encoded], dict[str, float]]:
    """Quantize the named Linears onto ``grid`` (minifloat or int) with ``rounding``; the model is
    left unchanged. Returns ``{"<module>.weight": (codes, side tensors, dequant)}`` and metrics."""
    named = dict(model.named_modules())
    for m in modules:
        grid.check(named[m].weight, f"{m}.weight")
    if rounding not in ROUNDINGS:
        raise QuantizationError(f"{method}: unknown rounding {rounding!r}; expected one of {list(ROUNDINGS)}")
    is_int = isinstance(grid, IntGrid)
    if rounding == "rtn":
        out = {}
        for m in modules:
            w = named[m].weight.detach().float()
            if is_int:
                codes, scales, zeros, dq = quantize_tensor(w, grid.bits, grid.granularity, grid.group_size,
                                                           grid.symmetric, f"{m}.weight")
                out[f"{m}.weight"] = (codes, _int_side(scales, zeros), dq)
            else:
                out[f"{m}.weight"] = grid.rtn(w, f"{m}.weight")
        return out, {}
    tokens = check_calibration(tokens, method)
    if rounding == "gptq":
        rtn_errors: dict[str, float] = {}

        def solve(name, w, h):
            if is_int:
                codes, scales, zeros, dq = gptq_quantize(w, h, grid.bits, grid.granularity, grid.group_size,
                                                         grid.symmetric, damp=cfg.damp, block_size=cfg.block_size,
                                                         act_order=cfg.act_order, name=name)
                rtn = quantize_tensor(w, grid.bits, grid.granularity, grid.group_size, grid.symmetric, name)[3]
                encoded = codes, _int_side(scales, zeros), dq
            else:
                encoded = gptq_minifloat(w, h, grid, damp=cfg.damp, block_size=cfg.block_size,
                                         act_order=cfg.act_order, name=name)
                rtn = grid.rtn(w, name)[2]
            rtn_errors[f"rtn_output_mse.{name.removesuffix('.weight')}"] = output_error(w, rtn, h)
            return encoded

        encoded, metrics = sequential_hessian_solve(model, tokens, modules, solve, cfg.batch_size)
        metrics.update(rtn_errors)
        layers = [k.removeprefix("output_mse.") for k in metrics if k.startswith("output_mse.")]
        metrics["layers_better_than_rtn"] = sum(metrics[f"output_mse.{n}"] <= metrics[f"rtn_output_mse.{n}"]
                                                for n in layers)
        metrics["layers_quantized"] = len(layers)
        return encoded, metrics

    def make(name, linear):
        if is_int:
            return AdaRoundWeight(linear.weight, grid, cfg.iters, cfg.reg_lambda, name=f"{name}.weight")
        return MinifloatAdaRound(linear.weight, grid, cfg.iters, cfg.reg_lambda, name=f"{name}.weight")

    config = ReconstructionConfig(mode="layer", iters=cfg.iters, lr=cfg.lr, batch_size=min(4, tokens.shape[0]),
                                  input_stream="quantized", seed=cfg.seed, progress=False)
    result = reconstruct(model, tokens, make, config, list(modules), method)
    out = {}
    for name, (codes, scales, zeros, dq) in result.weights.items():
        out[name] = (codes, _int_side(scales, zeros) if is_int else {grid.side_key: scales}, dq)
    metrics = {f"{unit}/{k}": float(v[k]) for unit, v in result.metrics.items() for k in ("loss_before", "loss_after")}
    return out, metrics


def _int_side(scales: torch.Tensor, zeros: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"scales": scales} if zeros is None else {"scales": scales, "zeros": zeros}


# --------------------------------------------------------------------------- the quantizer


class MinifloatPtqQuantizer(Quantizer):
    key = "minifloat_ptq"
    paper = Paper(title="Post Training Quantization with Low-precision Minifloats and Integers on FPGAs",
                  url="https://arxiv.org/abs/2311.12359", arxiv="2311.12359")
    needs_calibration = True  # gptq/learned use it; rtn ignores it (and accepts calibration=None)

    class Params(CalibratedParams):
        format: str = Field("e2m1", description="weight minifloat 'eXmY' with 1+X+Y in 3..8 bits "
                                                 "(e2m1 = FP4, e4m3/e5m2 = FP8, e3m2/e2m3 = FP6, ...)")
        rounding: Literal["rtn", "gptq", "learned"] = Field(
            "rtn", description="nearest grid value, GPTQ error feedback, or AdaRound-style learned up/down")
        scale_granularity: Literal["per_channel", "group"] = Field(
            "per_channel", description="one scale per row or per group")
        group_size: int = Field(128, gt=0, description="input weights per scale (scale_granularity=group)")
        scale_kind: Literal["float", "pow2"] = Field(
            "float", description="fp16 scale absmax/max (no saturation) or MX-style E8M0 power of two")
        activation_format: str | None = Field(
            None, description="None = weight-only; 'intN' or a minifloat name quantizes Linear inputs "
                              "dynamically at evaluation")
        activation_granularity: Literal["per_token", "per_tensor"] = Field("per_token", description="activation scales")
        damp: float = Field(0.01, gt=0, description="GPTQ Hessian damping (fraction of mean diag)")
        block_size: int = Field(128, gt=0, description="GPTQ lazy-batch block")
        act_order: bool = Field(False, description="GPTQ: visit columns by descending Hessian diagonal")
        batch_size: int = Field(8, gt=0, description="calibration sequences per forward pass")
        iters: int = Field(200, ge=0, description="learned rounding: Adam steps per Linear")
        lr: float = Field(1e-2, gt=0, description="learned rounding: Adam lr on V")
        reg_lambda: float = Field(0.01, ge=0, description="learned rounding: λ of the rounding regulariser")

        @field_validator("format")
        @classmethod
        def _format(cls, value: str) -> str:
            weight_format(value)
            return value

        @field_validator("activation_format")
        @classmethod
        def _activation(cls, value: str | None) -> str | None:
            activation_spec(value, ())
            return value

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        self.refuse_if_quantized(model)
        grid = MinifloatGrid(weight_format(p.format), p.scale_granularity, p.group_size, p.scale_kind)
        modules = [n for n, _ in self.target_linears(model)]
        spec = activation_spec(p.activation_format, modules, p.activation_granularity)
        cfg = RoundingConfig(p.damp, p.block_size, p.act_order, p.batch_size, p.iters, p.lr, p.reg_lambda, p.seed)
        start = time.perf_counter()
        encoded, metrics = quantize_weights(model, calibration, modules, grid, p.rounding, cfg, self.key)
        metrics["quantize_seconds"] = time.perf_counter() - start
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store = PackedWeights()
        sq, n = 0.0, 0
        for name, (codes, side, dequant) in encoded.items():
            weight = state[name].float()
            sq += float((weight - dequant).double().pow(2).sum())
            n += weight.numel()
            state[name] = dequant.to(state[name].dtype)
            store.add_codes(name, weight.shape, codes, grid.bits, side, **grid.info())
        metrics["weight_mse"] = sq / n
        meta = store.meta(self.key, bits=grid.bits, granularity=p.scale_granularity,
                          group_size=p.group_size if p.scale_granularity == "group" else None, symmetric=True,
                          rounding=p.rounding, **{k: v for k, v in grid.info().items() if k != "group_size"},
                          metrics=metrics)
        if spec is not None:
            meta["activations"] = spec.to_meta()
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)


# --------------------------------------------------------------------------- the grid study


def mean_loss(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over every predicted token (perplexity = exp of it)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            batch = tokens[s:s + batch_size].long()
            logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     batch[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += batch.shape[0] * (batch.shape[1] - 1)
    return total / count


def minifloat_vs_int_grid(model: PreTrainedModel, calibration: torch.Tensor | None, eval_tokens: torch.Tensor,
                          bits_range: Iterable[int] = range(3, 9), *, rounding: str = "rtn",
                          scale_granularity: str = "per_channel", group_size: int = 128,
                          select_by: Literal["calibration_loss", "weight_mse"] = "calibration_loss",
                          selection_sequences: int = 16, targets: Sequence[str] | None = None,
                          cfg: RoundingConfig = RoundingConfig(), batch_size: int = 8) -> list[dict]:
    """The paper's sweep: per bit width, INT (symmetric, same scale granularity) vs the best
    minifloat ``(E, M)`` split, each with weight MSE and perplexity on ``eval_tokens``.

    The best split is chosen without the eval tokens: by loss on the first ``selection_sequences``
    calibration sequences (default) or by weight MSE. Every split's weight MSE (and selection loss)
    is reported under ``"splits"``. The model is left unchanged. Rows::

        {bits, int_weight_mse, int_ppl, fp_format, fp_weight_mse, fp_ppl, splits: {name: {...}}, seconds}
    """
    if rounding != "rtn" or select_by == "calibration_loss":
        calibration = check_calibration(calibration, "minifloat_vs_int_grid")
    named = dict(model.named_modules())
    modules = list(targets) if targets is not None else [
        n for n, m in named.items() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    originals = {m: named[m].weight.detach().float() for m in modules}
    n_weights = sum(w.numel() for w in originals.values())
    select_tokens = calibration[:selection_sequences] if calibration is not None else None

    def run(grid):
        encoded, _ = quantize_weights(model, calibration, modules, grid, rounding, cfg, "minifloat_vs_int_grid")
        weights = {m: encoded[f"{m}.weight"][2] for m in modules}
        mse = sum(float((originals[m] - weights[m]).double().pow(2).sum()) for m in modules) / n_weights
        return weights, mse

    def loss_with(weights, tokens):
        with swapped_weights(named, weights):
            return mean_loss(model, tokens, batch_size)

    rows = []
    for bits in bits_range:
        start = time.perf_counter()
        int_granularity = "per_channel" if scale_granularity == "per_channel" else "group"
        int_w, int_mse = run(IntGrid(bits, int_granularity, group_size, True))
        splits, best, best_key = {}, None, math.inf
        for name in format_splits(bits):
            grid = MinifloatGrid(weight_format(name), scale_granularity, group_size, "float")
            w, mse = run(grid)
            entry = {"weight_mse": mse}
            key = mse
            if select_by == "calibration_loss":
                entry["selection_loss"] = key = loss_with(w, select_tokens)
            splits[name] = entry
            if key < best_key:
                best, best_key = (name, w, mse), key
        name, fp_w, fp_mse = best
        row = dict(bits=bits, int_weight_mse=int_mse, int_ppl=math.exp(loss_with(int_w, eval_tokens)),
                   fp_format=name, fp_weight_mse=fp_mse, fp_ppl=math.exp(loss_with(fp_w, eval_tokens)),
                   splits=splits)
        if select_by == "calibration_loss":
            row["int_selection_loss"] = loss_with(int_w, select_tokens)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows
