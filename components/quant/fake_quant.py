"""Fake quantizers: quantize-then-dequantize in floating point, differentiable by a straight-through
estimator (STE).

Shared by the post-training-quantization methods (GPTQ, AWQ, SmoothQuant, ...) to emulate a
number format in an fp32 forward pass, and by quantization-aware fine-tuning (LSQ). Everything here
returns values on the quantization grid in ``x.dtype``; packed integer storage lives in ``rtn.py``
and ``packing.py``.

Gradients: rounding passes the gradient straight through; saturation (clamping to the grid's range)
blocks it, i.e. a *clipped* STE, so values the quantizer cannot represent get no gradient. Scales
computed from the data (absmax, absmean) are statistics and are not differentiated.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Granularity = Literal["per_tensor", "per_channel", "group", "per_token"]
GRANULARITIES = ("per_tensor", "per_channel", "group", "per_token")
MAX_INT_BITS = 16  # integer grids stay exact in fp32 well beyond this


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``q``; backward sends the gradient to ``x`` (masked where ``mask`` is False).

    A Function instead of the ``x + (q - x).detach()`` trick: that trick is not bit-exact
    (``q - x`` rounds for large |x|, ``inf - inf`` is NaN, ``-0.0 + 0.0`` loses the sign).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if mask is not None:
            grad = torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        return grad, None, None


def straight_through(x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` in the forward pass, gradient w.r.t. ``x`` = ``mask`` (all ones if None) in the backward."""
    q = q.detach().to(x.dtype)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    return _StraightThrough.apply(x, q, None if mask is None else mask.detach().bool())


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    return _GradScale.apply(x, scale)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even; the gradient passes through unchanged."""
    return straight_through(x, torch.round(x.detach()))


# --------------------------------------------------------------------------- integer grids


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Code range: symmetric grids drop -2**(bits-1) so they are symmetric around 0 (as rtn.py)."""
    _check_int_bits(bits, symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def _check_int_bits(bits: int, symmetric: bool) -> None:
    low = 2 if symmetric else 1  # a symmetric 1-bit grid is {0}; use binarize()
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= MAX_INT_BITS:
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(f"{kind} integer quantization needs an int bits in [{low}, {MAX_INT_BITS}], "
                         f"got bits={bits!r}")


def _rows(x: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """A 2-D view of ``x`` whose rows are the sets that share one scale."""
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    if x.dim() == 0:
        raise ValueError(f"granularity={granularity!r} needs at least a 1-D tensor, got a scalar")
    if granularity == "per_channel":
        if x.dim() < 2:
            raise ValueError(f"granularity='per_channel' needs a weight of at least 2 dims "
                             f"([out, in, ...]), got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)
    if granularity == "per_token":
        return x.reshape(-1, x.shape[-1])
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size={group_size} does not divide the last dim {x.shape[-1]} "
                             f"of shape {tuple(x.shape)}")
        return x.reshape(-1, group_size)
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {list(GRANULARITIES)}")


def _broadcast(stat: torch.Tensor, x: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """Turn one value per row of ``_rows(x)`` (shape [rows, 1]) into a tensor broadcastable to x."""
    if granularity == "per_tensor":
        return stat.reshape([1] * x.dim())
    if granularity == "per_channel":
        return stat.reshape([x.shape[0]] + [1] * (x.dim() - 1))
    if granularity == "per_token":
        return stat.reshape(*x.shape[:-1], 1)
    return stat.expand(-1, group_size).reshape(x.shape)  # group: one value per element, repeated


def reduce_rows(x: torch.Tensor, granularity: str, group_size: int, fn) -> torch.Tensor:
    """``fn`` ([rows, n] -> [rows, 1]) over each scale-sharing set, broadcastable back to ``x``."""
    return _broadcast(fn(_rows(x, granularity, group_size)), x, granularity, group_size)


def int_scale_zero(x: torch.Tensor, bits: int, symmetric: bool = True,
                   granularity: Granularity = "per_channel", group_size: int = 128,
                   clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point, None if symmetric) for each scale-sharing set of ``x``.

    Both are fp32 and broadcastable to ``x``: per_tensor -> all-ones shape, per_channel ->
    [out, 1, ...], per_token -> [..., 1], group -> x's shape (each group's value repeated).
    ``clip_ratio`` shrinks the range (clipping search); the zero point is an integer code.
    """
    qmin, qmax = int_range(bits, symmetric)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got clip_ratio={clip_ratio!r}")
    xd = x.detach().float()
    if symmetric:
        absmax = reduce_rows(xd, granularity, group_size, lambda r: r.abs().amax(-1, keepdim=True))
        scale = absmax * clip_ratio / qmax
        zero = None
    else:
        low = reduce_rows(xd, granularity, group_size, lambda r: r.amin(-1, keepdim=True)).clamp(max=0)
        high = reduce_rows(xd, granularity, group_size, lambda r: r.amax(-1, keepdim=True)).clamp(min=0)
        scale = (high - low) * clip_ratio / qmax
    if not torch.isfinite(scale).all():
        raise ValueError("cannot compute quantization scales: the tensor contains inf or nan")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero set: any scale is exact
    if not symmetric:
        zero = torch.clamp(torch.round(-low * clip_ratio / scale), 0, qmax)
    return scale, zero


def _fake_quant_range(x: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | None,
                      qmin: int, qmax: int, clip_first: bool = False) -> torch.Tensor:
    """``(clamp(round(x / scale + zero), qmin, qmax) - zero) * scale`` with a clipped STE.

    x gets zero gradient where its code saturates. By default that means "rounds outside the
    grid", so the element that set an absmax scale keeps its gradient even when fp rounding puts
    it a hair above qmax. ``clip_first`` clamps before rounding, exactly as LSQ defines it (zero
    gradient as soon as x / scale leaves [qmin, qmax]). With ``scale`` requiring grad either form
    gives the LSQ step gradient: round(v) - v inside, the bound outside.
    """
    v = x / scale
    if zero is not None:
        v = v + zero
    q = round_ste(torch.clamp(v, qmin, qmax)) if clip_first else torch.clamp(round_ste(v), qmin, qmax)
    if zero is not None:
        q = q - zero
    return q * scale


def fake_quant_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                   bits: int = 8, symmetric: bool = True) -> torch.Tensor:
    """Quantize ``x`` to the ``bits``-bit integer grid ``(code - zero) * scale`` and dequantize.

    ``scale``/``zero`` must broadcast to ``x`` (see ``int_scale_zero``). Computed in fp32,
    returned in ``x.dtype``; gradients reach ``x`` inside the grid's range (and ``scale``
    if it requires grad).
    """
    qmin, qmax = int_range(bits, symmetric)
    if not symmetric and zero is None:
        raise ValueError("asymmetric fake_quant_int needs a zero point, got zero=None")
    out = _fake_quant_range(x.float(), scale, None if symmetric else zero, qmin, qmax)
    return out.to(x.dtype)


def quantize_int(x: torch.Tensor, bits: int, symmetric: bool = True,
                 granularity: Granularity = "per_channel", group_size: int = 128,
                 clip_ratio: float = 1.0) -> torch.Tensor:
    """Min-max integer fake quantization in one call (weights [out, in]; per_token for activations)."""
    scale, zero = int_scale_zero(x, bits, symmetric, granularity, group_size, clip_ratio)
    return fake_quant_int(x, scale, zero, bits, symmetric)


class IntFakeQuantizer(nn.Module):
    """``quantize_int`` as a module, e.g. to fake-quantize activations inside a forward hook."""

    def __init__(self, bits: int, symmetric: bool = True, granularity: Granularity = "per_token",
                 group_size: int = 128, clip_ratio: float = 1.0):
        super().__init__()
        int_range(bits, symmetric)  # validate early, not on the first forward
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; expected one of {list(GRANULARITIES)}")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.group_size, self.clip_ratio = group_size, clip_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_int(x, self.bits, self.symmetric, self.granularity, self.group_size,
                            self.clip_ratio)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity!r}"
                + (f", group_size={self.group_size}" if self.granularity == "group" else ""))


class LsqQuantizer(nn.Module):
    """Learned Step Size Quantization (Esser et al. 2019, arXiv:1902.08153).

    The step ``s`` is a parameter, initialised on the first forward to ``2 * mean|x| / sqrt(Qp)``;
    its gradient is scaled by ``g = 1 / sqrt(N * Qp)`` (N = elements sharing the step) so that
    step and weight updates have similar relative size. Signed grids use the full two's
    complement range ``[-2**(b-1), 2**(b-1) - 1]``, unsigned ones ``[0, 2**b - 1]``.
    ``channels`` gives one step per index of dim 0 (per output channel).
    """

    def __init__(self, bits: int, signed: bool = True, channels: int | None = None):
        super().__init__()
        _check_int_bits(bits, symmetric=signed)
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                     or channels <= 0):
            raise ValueError(f"channels must be a positive int or None, got channels={channels!r}")
        self.bits, self.signed, self.channels = bits, signed, channels
        self.qmin, self.qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        self.step = nn.Parameter(torch.ones(channels or 1))
        self.register_buffer("initialized", torch.tensor(False))

    def _per_step(self, x: torch.Tensor) -> torch.Tensor:
        """x as [steps, elements sharing that step]."""
        if self.channels is None:
            return x.reshape(1, -1)
        if x.dim() < 2 or x.shape[0] != self.channels:
            raise ValueError(f"LsqQuantizer(channels={self.channels}) needs x of shape "
                             f"[{self.channels}, ...], got {tuple(x.shape)}")
        return x.reshape(self.channels, -1)

    @torch.no_grad()
    def init_step(self, x: torch.Tensor) -> None:
        mean_abs = self._per_step(x.detach().float()).abs().mean(-1)
        self.step.copy_((2 * mean_abs / math.sqrt(self.qmax)).clamp(min=1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_step(x)
        n = self._per_step(x).shape[1]
        step = grad_scale(self.step, 1.0 / math.sqrt(n * self.qmax)).clamp(min=1e-8)
        if self.channels is not None:
            step = step.reshape([self.channels] + [1] * (x.dim() - 1))
        return _fake_quant_range(x.float(), step, None, self.qmin, self.qmax, clip_first=True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={self.channels}"


# --------------------------------------------------------------------------- 1-bit, 1.58-bit, fixed point


def _absmean(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    a = x.detach().float().abs()
    return a.mean() if dim is None else a.mean(dim, keepdim=True)


def binarize(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """``sign(x) * mean|x|`` (XNOR-Net), one scale per slice along ``dim`` (None: per tensor).

    sign(0) is +1 so every output is ±scale; the gradient passes straight through.
    """
    alpha = _absmean(x, dim)
    q = torch.where(x.detach() >= 0, alpha, -alpha)
    return straight_through(x, q)


def ternarize(x: torch.Tensor, dim: int | None = -1, eps: float = 1e-5) -> torch.Tensor:
    """Absmean ternary (BitNet b1.58 / TriLM): ``round(clamp(x / s, -1, 1)) * s``, s = mean|x|.

    One scale per slice along ``dim`` (None: per tensor); outputs are in {-s, 0, s}; the
    gradient passes straight through, as in BitNet's training recipe.
    """
    scale = _absmean(x, dim).clamp(min=eps)
    q = torch.round(torch.clamp(x.detach().float() / scale, -1, 1)) * scale
    return straight_through(x, q)


FRAC_BITS_LIMIT = 100  # |binary point| of the fixed-point grid: keeps 2^f and 2^-f finite in fp32


def fixed_point(x: torch.Tensor, total_bits: int, frac_bits: int, signed: bool = True,
                stochastic: bool = False) -> torch.Tensor:
    """Round to multiples of ``2**-frac_bits`` with ``total_bits`` bits (two's complement if signed).

    Saturates to the representable range; a clipped STE gives saturated values zero gradient.
    ``stochastic`` rounds up with probability equal to the fraction (``floor(v + u)``, u uniform in
    [0, 1) from torch's global generator), which is unbiased: E[q] = x inside the range.
    """
    if isinstance(total_bits, bool) or not isinstance(total_bits, int) or not 1 <= total_bits <= 24:
        raise ValueError(f"total_bits must be an int in [1, 24], got total_bits={total_bits!r}")
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or abs(frac_bits) > FRAC_BITS_LIMIT:
        raise ValueError(f"frac_bits must be an int in [-{FRAC_BITS_LIMIT}, {FRAC_BITS_LIMIT}], got frac_bits={frac_bits!r}")
    qmin, qmax = (-(2 ** (total_bits - 1)), 2 ** (total_bits - 1) - 1) if signed else (0, 2**total_bits - 1)
    step = 2.0**-frac_bits
    if not stochastic:
        return _fake_quant_range(x.float(), step, None, qmin, qmax).to(x.dtype)
    v = x.detach().float() / step
    codes = torch.floor(v + torch.rand_like(v))
    return straight_through(x, torch.clamp(codes, qmin, qmax) * step, (codes >= qmin) & (codes <= qmax))


def shared_exponent_frac_bits(x: torch.Tensor, total_bits: int) -> int:
    """The binary point of dynamic fixed point (Das et al. 2018): one exponent shared by the whole
    tensor, chosen from its current absmax so that the largest magnitude lands on the top magnitude
    bit of a signed ``total_bits``-bit integer, ``f = total_bits - 2 - floor(log2 max|x|)``. This is
    the scale factor of Intel's DFP16 kernels (libxsmm ``libxsmm_quantize_i16``: ``scf = 14 -
    (max_exp - 127)``, read), for any width. Nothing clips except a value that rounds up past the
    top code. A zero tensor gets 0; a non-finite absmax is refused (ValueError)."""
    absmax = float(x.detach().abs().max())
    if not math.isfinite(absmax):
        raise ValueError(f"absmax is {absmax}")
    if absmax == 0.0:
        return 0
    frac_bits = total_bits - 2 - math.floor(math.log2(absmax))
    return max(-FRAC_BITS_LIMIT, min(FRAC_BITS_LIMIT, frac_bits))  # beyond: all codes saturate or round to 0
