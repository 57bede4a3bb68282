"""Arbitrary (exponent, mantissa) minifloat emulation, bit-exact with torch's float8 / bfloat16 casts.

A format is a sign bit, ``exp_bits`` exponent bits with ``bias`` and ``man_bits`` mantissa bits,
with subnormals and round-to-nearest-even. Formats differ in what the top codes mean:

- ``nan_encoding="ieee"`` (``has_inf=True``): the all-ones exponent holds ±inf and NaNs
  (float8_e5m2, bfloat16);
- ``"ocp"``: no inf; only the all-ones code (exponent and mantissa) is NaN, so the top binade is
  usable (float8_e4m3fn, OCP FP8 E4M3);
- ``"none"``: every code is finite (OCP MX FP4 E2M1 and FP6 E3M2/E2M3).

Overflow (a value that rounds above ``max_value``, including ±inf inputs) saturates to ±max when
``saturate``; otherwise it becomes ±inf if the format has inf, else NaN. torch (2.13, checked in
c10's ``fp8e4m3fn_from_fp32_value`` and by the tests) casts float8_e4m3fn *saturating*
(overflow and ±inf -> ±448, NaN -> NaN) and float8_e5m2 / bfloat16 IEEE-style (overflow -> ±inf),
so the presets use exactly those settings.

Emulation works on fp32 values and returns fp32; every result is exactly representable in fp32.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from components.quant.fake_quant import reduce_rows, straight_through

NanEncoding = Literal["ieee", "ocp", "none"]
ScaleGranularity = Literal["none", "per_tensor", "per_channel", "per_token", "block"]
FP32_MAX = float(torch.finfo(torch.float32).max)
FP32_MIN_SUBNORMAL_EXP = -149  # 2**-149 is fp32's smallest subnormal
E8M0_EXP_RANGE = (-127, 127)  # OCP MX shared-scale exponent range


@dataclass(frozen=True)
class MinifloatFormat:
    exp_bits: int
    man_bits: int
    bias: int | None = None  # None: IEEE default 2**(exp_bits-1) - 1
    has_inf: bool = False
    nan_encoding: NanEncoding = "ocp"
    saturate: bool = True
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        e, m = self.exp_bits, self.man_bits
        if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= 8:
            raise ValueError(f"exp_bits must be an int in [1, 8], got exp_bits={e!r}")
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 23:
            raise ValueError(f"man_bits must be an int in [0, 23], got man_bits={m!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (e - 1) - 1)
        elif isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise ValueError(f"bias must be an int, got bias={self.bias!r}")
        if self.nan_encoding not in ("ieee", "ocp", "none"):
            raise ValueError(f"nan_encoding must be 'ieee', 'ocp' or 'none', got {self.nan_encoding!r}")
        if self.has_inf != (self.nan_encoding == "ieee"):
            raise ValueError(f"has_inf={self.has_inf} needs nan_encoding='ieee' (the all-ones exponent "
                             f"holds inf and NaN) and vice versa; got nan_encoding={self.nan_encoding!r}")
        if not self.saturate and not self.has_inf and self.nan_encoding == "none":
            raise ValueError(f"e{e}m{m} with nan_encoding='none' has no inf or NaN to overflow to; "
                             "it must saturate (saturate=True)")
        if self.emax < self.emin:
            raise ValueError(f"e{e}m{m} with nan_encoding={self.nan_encoding!r} has no normal numbers")
        if self.max_value > FP32_MAX:
            raise ValueError(f"e{e}m{m} with bias={self.bias} reaches {self.max_value:.3g}, beyond fp32; "
                             "fp32 emulation cannot represent it")
        if not self.name:
            object.__setattr__(self, "name", f"e{e}m{m}")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal binade (subnormals share its step)."""
        return 1 - self.bias

    @property
    def _top_exp_field(self) -> int:
        """Largest exponent field that holds finite values."""
        all_ones = 2**self.exp_bits - 1
        if self.nan_encoding == "ieee" or (self.nan_encoding == "ocp" and self.man_bits == 0):
            return all_ones - 1
        return all_ones

    @property
    def emax(self) -> int:
        return self._top_exp_field - self.bias

    @property
    def max_value(self) -> float:
        top_man = 2**self.man_bits - 1
        if self.nan_encoding == "ocp" and self.man_bits > 0:
            top_man -= 1  # all-ones mantissa at the top exponent is NaN
        return math.ldexp(2**self.man_bits + top_man, self.emax - self.man_bits)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.man_bits)


E4M3 = MinifloatFormat(4, 3, 7, has_inf=False, nan_encoding="ocp", saturate=True, name="e4m3")
E5M2 = MinifloatFormat(5, 2, 15, has_inf=True, nan_encoding="ieee", saturate=False, name="e5m2")
E2M1 = MinifloatFormat(2, 1, 1, has_inf=False, nan_encoding="none", saturate=True, name="e2m1")
E3M2 = MinifloatFormat(3, 2, 3, has_inf=False, nan_encoding="none", saturate=True, name="e3m2")
E2M3 = MinifloatFormat(2, 3, 1, has_inf=False, nan_encoding="none", saturate=True, name="e2m3")
BF16 = MinifloatFormat(8, 7, 127, has_inf=True, nan_encoding="ieee", saturate=False, name="bf16")
PRESETS = {f.name: f for f in (E4M3, E5M2, E2M1, E3M2, E2M3, BF16)}
_ALIASES = {"fp8_e4m3": "e4m3", "float8_e4m3fn": "e4m3", "fp8_e5m2": "e5m2", "float8_e5m2": "e5m2",
            "fp4": "e2m1", "fp4_e2m1": "e2m1", "fp6_e3m2": "e3m2", "fp6_e2m3": "e2m3",
            "bfloat16": "bf16", "e8m7": "bf16"}


def from_name(name: str) -> MinifloatFormat:
    """A preset by name or alias ("e4m3", "fp4", "bfloat16", ...); any other "eXmY" is an
    all-finite saturating format with the default bias (the MX FP4/FP6 convention)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    match = re.fullmatch(r"e(\d+)m(\d+)", key)
    if not match:
        raise ValueError(f"unknown minifloat format {name!r}; expected one of {sorted(PRESETS)}, "
                         f"an alias in {sorted(_ALIASES)}, or 'eXmY'")
    return MinifloatFormat(int(match[1]), int(match[2]), nan_encoding="none")


def _as_format(fmt: MinifloatFormat | str) -> MinifloatFormat:
    return from_name(fmt) if isinstance(fmt, str) else fmt


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``2**exp`` for integer exponents in [-149, 127], built from bits (no libm pow)."""
    exp = exp.to(torch.int32)
    normal = (exp + 127).clamp(min=1) << 23
    subnormal = torch.ones_like(exp) << (exp + 149).clamp(0, 22)
    return torch.where(exp >= -126, normal, subnormal).view(torch.float32)


def round_to_format(x: torch.Tensor, fmt: MinifloatFormat | str) -> torch.Tensor:
    """Round ``x`` to the nearest ``fmt`` value (ties to even); fp32 out, no gradient.

    Equals ``x.to(torch.float8_e4m3fn / float8_e5m2 / bfloat16).float()`` for the presets,
    including ±0, subnormals, NaN and overflow.
    """
    fmt = _as_format(fmt)
    xf = x.detach().to(torch.float32)
    a = xf.abs()
    _, e = torch.frexp(a)  # a = f * 2**e with f in [0.5, 1): floor(log2 a) = e - 1
    exp = (e - 1).clamp(min=fmt.emin)  # below the normal range the step stays the subnormal one
    step = _pow2((exp - fmt.man_bits).clamp(min=FP32_MIN_SUBNORMAL_EXP))
    y = torch.round(a / step) * step  # both exact: step is a power of two; may reach inf
    over = y > fmt.max_value  # also catches inf inputs; NaN compares False and passes through
    if fmt.saturate:
        y = torch.where(over, fmt.max_value, y)
    else:
        y = torch.where(over, math.inf if fmt.has_inf else math.nan, y)
    return torch.copysign(y, xf)  # restores the sign, including -0.0 for underflow


def minifloat_quantize(x: torch.Tensor, exp_bits: int, man_bits: int, bias: int | None = None, *,
                       saturate: bool = True, has_inf: bool = False,
                       nan_encoding: NanEncoding | None = None) -> torch.Tensor:
    """``round_to_format`` for an ad-hoc format; ``nan_encoding`` defaults to "ieee" if
    ``has_inf`` else "ocp" (the E4M3 convention)."""
    if nan_encoding is None:
        nan_encoding = "ieee" if has_inf else "ocp"
    fmt = MinifloatFormat(exp_bits, man_bits, bias, has_inf=has_inf, nan_encoding=nan_encoding,
                          saturate=saturate)
    return round_to_format(x, fmt)


def _block_scale(x: torch.Tensor, fmt: MinifloatFormat, granularity: str, block_size: int,
                 scale_kind: str) -> torch.Tensor:
    """Per-set scale (broadcastable to x) mapping each set's absmax onto the format's range."""
    rows_gran = {"block": "group", "per_token": "per_token", "per_channel": "per_channel",
                 "per_tensor": "per_tensor"}[granularity]
    amax = reduce_rows(x, rows_gran, block_size, lambda r: r.abs().amax(-1, keepdim=True))
    if scale_kind == "float":
        scale = amax / fmt.max_value
    else:  # OCP MX: 2**(floor(log2 amax) - emax), an E8M0 exponent; may clip the absmax element
        _, e = torch.frexp(amax)
        scale = _pow2((e - 1 - fmt.emax).clamp(*E8M0_EXP_RANGE))
    return torch.where(amax == 0, torch.ones_like(scale), scale)  # all-zero set: any scale is exact


def minifloat_fake_quant(x: torch.Tensor, fmt: MinifloatFormat | str, block_size: int | None = None, *,
                         scale_granularity: ScaleGranularity | None = None,
                         scale_kind: Literal["float", "pow2"] = "float") -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt`` (in ``x.dtype``) with a straight-through gradient.

    Without scaling (``scale_granularity="none"``, the default when ``block_size`` is None) values
    are cast as-is. With ``block_size`` (granularity "block": ``block_size`` consecutive elements
    along the last dim) or "per_tensor" / "per_channel" / "per_token", each set shares a scale
    that maps its absmax to ``fmt.max_value`` ("float", fp32 scale) or, as in OCP MX, the power of
    two ``2**(floor(log2 absmax) - emax)`` ("pow2"), which can saturate the largest elements.
    Scaled values always saturate. Saturated elements get zero gradient (clipped STE).
    """
    fmt = _as_format(fmt)
    granularity = scale_granularity or ("block" if block_size is not None else "none")
    if granularity not in ("none", "per_tensor", "per_channel", "per_token", "block"):
        raise ValueError(f"unknown scale_granularity {granularity!r}")
    if (granularity == "block") != (block_size is not None):
        raise ValueError(f"block_size={block_size!r} goes with scale_granularity='block' and only "
                         f"with it, got scale_granularity={granularity!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size <= 0 or x.dim() == 0 or x.shape[-1] % block_size):
        raise ValueError(f"block_size={block_size!r} must be a positive int dividing the last dim of "
                         f"shape {tuple(x.shape)}")
    if scale_kind not in ("float", "pow2"):
        raise ValueError(f"scale_kind must be 'float' or 'pow2', got {scale_kind!r}")
    xf = x.detach().float()
    if granularity == "none":
        return straight_through(x, round_to_format(xf, fmt), xf.abs() <= fmt.max_value)
    scale = _block_scale(xf, fmt, granularity, block_size, scale_kind)
    v = xf / scale
    q = round_to_format(v.clamp(-fmt.max_value, fmt.max_value), fmt) * scale
    # float scales put every element in range by construction (v may exceed max by an ulp)
    mask = None if scale_kind == "float" else v.abs() <= fmt.max_value
    return straight_through(x, q, mask)


class MinifloatFakeQuantizer(nn.Module):
    """``minifloat_fake_quant`` as a module (activations, or weights inside a wrapper)."""

    def __init__(self, fmt: MinifloatFormat | str, block_size: int | None = None,
                 scale_granularity: ScaleGranularity | None = None, scale_kind: str = "float"):
        super().__init__()
        self.fmt, self.block_size = _as_format(fmt), block_size
        self.scale_granularity, self.scale_kind = scale_granularity, scale_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return minifloat_fake_quant(x, self.fmt, self.block_size,
                                    scale_granularity=self.scale_granularity, scale_kind=self.scale_kind)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, block_size={self.block_size}, scale_kind={self.scale_kind!r}"


# --------------------------------------------------------------------------- storage codes


def _check_codable(fmt: MinifloatFormat) -> None:
    if fmt.bits > 8:
        raise ValueError(f"{fmt.name} has {fmt.bits} bits; encode/decode handle formats of at most 8")
    if fmt.emin - fmt.man_bits < FP32_MIN_SUBNORMAL_EXP:
        raise ValueError(f"{fmt.name} subnormals ({fmt.min_subnormal:.3g}) are below fp32's range")


def encode(x: torch.Tensor, fmt: MinifloatFormat | str) -> torch.Tensor:
    """Round ``x`` to ``fmt`` and return its codes (sign | exponent | mantissa, low bits) as uint8.

    For the float8 presets this equals ``x.to(torch.float8_*).view(torch.uint8)``; NaN becomes the
    all-ones code with the input's sign.
    """
    fmt = _as_format(fmt)
    _check_codable(fmt)
    m = fmt.man_bits
    y = round_to_format(x, fmt)
    nan = torch.isnan(y)
    if fmt.nan_encoding == "none" and bool(nan.any()):
        raise ValueError(f"{fmt.name} has no NaN code, but the input contains NaN")
    a = y.abs()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, torch.zeros_like(a))
    _, e = torch.frexp(a)
    normal = a >= fmt.min_normal
    exp = torch.where(normal, e - 1, torch.full_like(e, fmt.emin))
    man = (a / _pow2(exp - m)).to(torch.int32)  # exact integer: 2**m + mantissa if normal
    exp_field = torch.where(normal, exp + fmt.bias, torch.zeros_like(exp))
    man = torch.where(normal, man - 2**m, man)
    all_ones_exp = 2**fmt.exp_bits - 1
    exp_field = torch.where(finite, exp_field, torch.full_like(exp_field, all_ones_exp))
    man = torch.where(finite, man, torch.where(nan, torch.full_like(man, 2**m - 1), torch.zeros_like(man)))
    code = (torch.signbit(y).to(torch.int32) << (fmt.exp_bits + m)) | (exp_field << m) | man
    return code.to(torch.uint8)


def decode(codes: torch.Tensor, fmt: MinifloatFormat | str) -> torch.Tensor:
    """fp32 values of ``fmt`` codes (the inverse of ``encode``; any code below 2**bits is valid)."""
    fmt = _as_format(fmt)
    _check_codable(fmt)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    c = codes.to(torch.int32)
    if bool(((c < 0) | (c >= 2**fmt.bits)).any()):
        raise ValueError(f"{fmt.name} codes must lie in [0, {2**fmt.bits - 1}]")
    e_bits, m = fmt.exp_bits, fmt.man_bits
    sign = (c >> (e_bits + m)) & 1
    exp_field = (c >> m) & (2**e_bits - 1)
    man = c & (2**m - 1)
    normal = exp_field > 0
    exp = torch.where(normal, exp_field - fmt.bias, torch.full_like(exp_field, fmt.emin))
    significand = torch.where(normal, man + 2**m, man).to(torch.float32)
    value = significand * _pow2((exp - m).clamp(FP32_MIN_SUBNORMAL_EXP, 127))
    top = exp_field == 2**e_bits - 1
    if fmt.nan_encoding == "ieee":
        value = torch.where(top, torch.where(man == 0, math.inf, math.nan), value)
    elif fmt.nan_encoding == "ocp":
        value = torch.where(top & (man == 2**m - 1), math.nan, value)
    return torch.where(sign == 1, -value, value)
