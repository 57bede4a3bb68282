"""GPTQ: the layer-wise solver (Frantar et al. 2022, arXiv 2210.17323), no model plumbing.

For one ``nn.Linear`` with weight ``W [out, in]`` and calibration inputs ``X [n, in]``, GPTQ picks
quantized weights ``Q`` that keep ``||X Wᵀ - X Qᵀ||²`` small. It quantizes the input columns one
at a time and, after each column, spreads that column's rounding error over the columns not yet
quantized, weighted by the inverse of the Hessian ``H = (2/n) Xᵀ X`` (Optimal Brain Surgeon
update). Implementation notes, following the paper's Sections 3-4:

- The Cholesky factor ``U`` (upper) of ``H⁻¹`` replaces the repeated inverse updates: row ``i``
  of ``U`` holds exactly the coefficients used to spread column ``i``'s error.
- Columns are processed in blocks of ``block_size``: inside a block the error is spread over the
  block's own columns at once; the rest of the matrix gets one matrix-product update per block
  ("lazy batch updates"), which gives the same result as updating after every column.
- Dead inputs (``H_ii == 0``: the input never fires) get ``H_ii = 1`` and a zero weight column.
- Damping ``H += damp * mean(diag H) * I`` keeps the factorization stable; if it still fails the
  damping is raised tenfold a few times, then a ``QuantizationError`` names the layer.

The result is in exactly the packed format of ``rtn.quantize_tensor`` (see ``base``): uint8
codes, fp16 scales ``[rows, groups]`` (rounded up like RTN's), uint8 zero points for asymmetric
grids, and the fp32 dequantized weight computed as ``(code - zero) * scale`` from the *stored*
fp16 scales. The grid is RTN's: symmetric ``scale = absmax / (2**(bits-1) - 1)`` with codes
``q + 2**(bits-1)``, ``|q| <= 2**(bits-1) - 1``; asymmetric min/max (range widened to include 0).

Where the scales come from:

- ``per_tensor``: one scale from the whole original weight.
- ``per_channel``: one scale per output row from the original weight.
- ``group`` (default, as in the reference implementation): each group's per-row scale is refit
  when the solver reaches the group's first column, from the group's *current* weights, i.e.
  after the error updates from all earlier columns. (Those are computed exactly even when a group
  starts inside a block or spans two blocks; the reference reads the block-start values there.)
- ``group`` with ``static_groups=True``, and always with ``act_order=True``: every group's scale
  is computed up front from the original weights in natural column order. With act_order the
  columns are visited by descending ``H_ii``, so one natural-order group's columns are spread over
  the whole pass; fixing its scale in advance keeps scale ``g`` valid for natural columns
  ``[g*group_size, (g+1)*group_size)`` and the packed format unchanged (no ``g_idx`` needed). This
  is the reference's "static groups" option; llm-compressor also uses scales fixed in advance.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from components.quant.base import QuantizationError
from components.quant.packing import SUPPORTED_BITS

GRANULARITIES = ("per_tensor", "per_channel", "group")
FP16_MAX = float(torch.finfo(torch.float16).max)
DAMP_RETRIES = 4  # extra attempts, each with ten times the previous damping


class HessianAccumulator:
    """Running ``H = (2/n) Σ x xᵀ`` over a Linear's inputs, fed one batch at a time.

    Batches have shape ``[..., in_features]``; every leading position counts as one sample. The
    running-mean form rescales the old sum before adding each batch, so the value after any
    number of batches equals the formula over all samples seen so far.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None, name: str = "layer"):
        if in_features <= 0:
            raise QuantizationError(f"{name}: in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise QuantizationError(f"{name}: Hessian dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.name = name
        self.n_samples = 0
        self._h = torch.zeros(in_features, in_features, dtype=dtype, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Fold one batch of inputs ``[..., in_features]`` into the running Hessian."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"{self.name}: input batch of shape {tuple(x.shape)} does not end in "
                f"in_features={self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(device=self._h.device, dtype=self._h.dtype)
        m = x.shape[0]
        if m == 0:
            return
        if not torch.isfinite(x).all():
            raise QuantizationError(f"{self.name}: calibration inputs contain non-finite values")
        total = self.n_samples + m
        self._h.mul_(self.n_samples / total)
        x = x * math.sqrt(2.0 / total)
        self._h.addmm_(x.T, x)
        self.n_samples = total

    update = add

    def hook(self, module, inputs, output=None) -> None:
        """Forward (pre-)hook signature: accumulate the module's first positional input."""
        self.add(inputs[0])

    @property
    def hessian(self) -> torch.Tensor:
        """A copy of the current ``(2/n) Σ x xᵀ`` (zeros before any sample)."""
        return self._h.clone()


def _fit_grid(rows: torch.Tensor, bits: int, symmetric: bool, name: str):
    """RTN's grid for each row of ``rows [R, k]``.

    Returns ``(scale16 [R] fp16, step [R] fp32, zero [R] fp32)``: the stored scale rounded up to
    fp16 (never down), the step it gives in fp32, and the (float) zero point.
    """
    levels = 2**bits - 1
    if symmetric:
        scale = rows.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        low = None
    else:
        low = rows.amin(dim=-1).clamp(max=0)
        high = rows.amax(dim=-1).clamp(min=0)
        scale = (high - low) / levels
    if not torch.isfinite(scale).all():
        raise QuantizationError(f"{name}: non-finite weights while fitting scales; cannot quantize")
    if scale.max() > FP16_MAX:
        raise QuantizationError(
            f"{name}: weight range too large for fp16 scales (max scale {float(scale.max()):.3g})")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale16 = scale.to(torch.float16)
    scale16 = torch.where(scale16.to(torch.float32) < scale,
                          torch.nextafter(scale16, torch.full_like(scale16, float("inf"))), scale16)
    step = scale16.to(torch.float32)
    if symmetric:
        zero = torch.full_like(step, float(2 ** (bits - 1)))
    else:
        zero = torch.clamp(torch.round(-low / step), 0, levels)
    return scale16, step, zero


def _quantize_column(w: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int,
                     symmetric: bool):
    """Codes (float) and dequantized values of one column ``w [out]`` on a per-row grid."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(w / step), -qmax, qmax) + zero
    else:
        q = torch.clamp(torch.round(w / step) + zero, 0, 2**bits - 1)
    return q, (q - zero) * step


def _factorize(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, λ = damp·mean(diag H); raises damping on failure."""
    mean_diag = float(torch.diagonal(h).mean())
    dampings = [damp] + [max(damp, 1e-3) * 10**k for k in range(1, DAMP_RETRIES + 1)]
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt, d in enumerate(dampings):
        hd = h + (d * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    warnings.warn(f"{name}: Hessian not positive definite with damp={damp}; "
                                  f"succeeded with damp={d}", RuntimeWarning, stacklevel=3)
                return upper
    raise QuantizationError(
        f"{name}: Hessian is not positive definite even with damp={dampings[-1]} "
        f"(mean diagonal {mean_diag:.3g}); the calibration inputs of this layer look degenerate")


def _validate(weight, hessian, bits, granularity, group_size, symmetric, damp, block_size, name):
    if weight.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"{name}: unsupported bits={bits!r}; supported bits: {list(SUPPORTED_BITS)}")
    if symmetric and bits < 2:
        raise QuantizationError(f"{name}: a symmetric grid needs bits >= 2, got bits={bits}; "
                                "use symmetric=False for 1-bit codes")
    if granularity not in GRANULARITIES:
        raise QuantizationError(
            f"{name}: unknown granularity {granularity!r}; expected one of {list(GRANULARITIES)}")
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise QuantizationError(f"{name}: group_size must be a positive integer, got {group_size!r}")
        if in_features % group_size:
            raise QuantizationError(
                f"{name}: group_size={group_size} does not divide its input width {in_features}; "
                "choose a group_size that divides every targeted layer's in_features")
    if tuple(hessian.shape) != (in_features, in_features):
        raise QuantizationError(
            f"{name}: Hessian shape {tuple(hessian.shape)} does not match the weight's input width "
            f"(expected ({in_features}, {in_features}) for weight shape {tuple(weight.shape)})")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise QuantizationError(f"{name}: damp must be a finite number >= 0, got {damp!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise QuantizationError(f"{name}: block_size must be a positive integer, got {block_size!r}")
    if not torch.isfinite(weight).all():
        raise QuantizationError(f"{name}: weight contains non-finite values; cannot quantize")
    if not torch.isfinite(hessian).all():
        raise QuantizationError(f"{name}: Hessian contains non-finite values; check the calibration inputs")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, granularity: str = "group",
                  group_size: int = 128, symmetric: bool = True, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  name: str = "weight"):
    """GPTQ-quantize one weight ``[out, in]`` given its input Hessian ``[in, in]``.

    Returns ``(codes uint8 [out, in], scales fp16 [rows, groups], zeros uint8 or None,
    dequantized fp32 [out, in])``, the same format as ``rtn.quantize_tensor``. ``act_order``
    visits columns by descending ``H_ii``; with ``granularity="group"`` it implies static groups
    (see the module docstring). The inputs are not modified.
    """
    _validate(weight, hessian, bits, granularity, group_size, symmetric, damp, block_size, name)
    out_features, in_features = weight.shape
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()

    # Fixed grids, from the original weight (before dead columns are zeroed, as the reference).
    groups = in_features // group_size if granularity == "group" else 1
    scales16 = torch.empty(out_features if granularity != "per_tensor" else 1, groups,
                           dtype=torch.float16, device=device)
    zeros_f = torch.empty(scales16.shape, dtype=torch.float32, device=device)
    static = granularity != "group" or static_groups or act_order
    if granularity == "per_tensor":
        s16, _, z = _fit_grid(W.reshape(1, -1), bits, symmetric, name)
        scales16[:, 0], zeros_f[:, 0] = s16, z
    elif granularity == "per_channel":
        s16, _, z = _fit_grid(W, bits, symmetric, name)
        scales16[:, 0], zeros_f[:, 0] = s16, z
    elif static:
        s16, _, z = _fit_grid(W.reshape(out_features * groups, group_size), bits, symmetric, name)
        scales16.copy_(s16.reshape(out_features, groups))
        zeros_f.copy_(z.reshape(out_features, groups))

    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    U = _factorize(H, float(damp), name).to(torch.float32)
    del H

    # Natural column index -> column of scales16/zeros_f; in solver order.
    natural = perm if perm is not None else torch.arange(in_features, device=device)
    col_group = natural // group_size if granularity == "group" else torch.zeros_like(natural)
    col_group = col_group.tolist()

    def grid(g: int):
        step = scales16[:, g].to(torch.float32)
        zero = zeros_f[:, g]
        if granularity == "per_tensor":
            step, zero = step.expand(out_features), zero.expand(out_features)
        return step, zero

    codes = torch.empty(out_features, in_features, dtype=torch.float32, device=device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        current_g, step, zero = -1, None, None
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group[col]
            if not static and col % group_size == 0:
                # Refit from the group's current weights: in-block columns already carry the
                # updates of this block's earlier columns; columns past the block get them here.
                end = col + group_size
                current = W1[:, i:min(i2 - i1, i + group_size)]
                if end > i2:
                    rest = W[:, i2:end] - Err1[:, :i] @ U[i1:col, i2:end]
                    current = torch.cat([current, rest], dim=1)
                s16, _, z = _fit_grid(current, bits, symmetric, name)
                scales16[:, g], zeros_f[:, g] = s16, z
                current_g = -1
            if g != current_g:
                step, zero = grid(g)
                current_g = g
            w = W1[:, i]
            q, dq = _quantize_column(w, step, zero, bits, symmetric)
            codes[:, col] = q
            err = (w - dq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        if i2 < in_features:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]

    # Dequantize from the stored fp16 scales exactly as the packed format does.
    rows = scales16.shape[0]
    grouped = codes.reshape(rows, groups, -1)
    dequant = ((grouped - zeros_f.unsqueeze(-1)) * scales16.to(torch.float32).unsqueeze(-1))
    dequant = dequant.reshape(out_features, in_features)
    zeros = None if symmetric else zeros_f.to(torch.uint8)
    return codes.to(torch.uint8), scales16, zeros, dequant


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ``||X Wᵀ - X Qᵀ||² / (n·out)`` from ``H = (2/n) XᵀX``."""
    delta = (weight - quantized).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", delta, hessian.to(torch.float64), delta) / (2 * weight.shape[0]))


class ColumnRule:
    """What the error-feedback walk does to each column: GPTQ rounds it onto a grid, SparseGPT
    zeroes the weights its mask drops. ``start_block`` sees each block of columns before the
    walk reaches it (current weights ``W1 [out, b]`` and the diagonal ``d [b]`` of the inverse
    Hessian's Cholesky factor there), for rules that choose per block."""

    def start_block(self, W1: torch.Tensor, d: torch.Tensor) -> None:
        pass

    def column(self, W1: torch.Tensor, i: int, natural: int, d: torch.Tensor) -> torch.Tensor:
        """The new value of in-block column ``i`` (natural column index ``natural``), fp32 ``[out]``."""
        raise NotImplementedError


class _GridRule(ColumnRule):
    def __init__(self, round_column: Callable[[torch.Tensor, int], torch.Tensor]):
        self.round_column = round_column

    def column(self, W1, i, natural, d):
        return self.round_column(W1[:, i], natural)


def obs_walk(weight: torch.Tensor, hessian: torch.Tensor, rule: ColumnRule, *, damp: float = 0.01,
             block_size: int = 128, act_order: bool = False, name: str = "weight") -> torch.Tensor:
    """The Optimal Brain Surgeon column walk that GPTQ and SparseGPT share (module docstring):
    each column becomes ``rule.column(...)`` and its error is spread over the columns not yet
    visited, in blocks of ``block_size`` with lazy updates. Returns the new weight ``[out, in]``
    in natural column order; the inputs are not modified."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise QuantizationError(f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
             else torch.arange(W.shape[1]))
    W, H = W[:, order], H[order][:, order]
    U = _factorize(H, float(damp), name).to(torch.float32)
    Q = torch.empty_like(W)
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        rule.start_block(W1, d)
        for i in range(i2 - i1):
            q = rule.column(W1, i, int(order[i1 + i]), d)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(order)]


def gptq_with_grid(weight: torch.Tensor, hessian: torch.Tensor,
                   round_column: Callable[[torch.Tensor, int], torch.Tensor], *, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False, name: str = "weight") -> torch.Tensor:
    """GPTQ's error-feedback loop over any fixed grid (e.g. a scaled minifloat format).

    ``round_column(w [out], natural_column_index)`` returns the column rounded onto the grid
    (fp32); the grid must be fixed before the loop (scales from the original weight), as in
    static-group GPTQ. Returns the quantized weight ``[out, in]`` in natural column order.
    """
    return obs_walk(weight, hessian, _GridRule(round_column), damp=damp, block_size=block_size,
                    act_order=act_order, name=name)
