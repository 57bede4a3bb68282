"""Orthonormal (block) Walsh-Hadamard rotations, applied along one dimension of a tensor.

A Sylvester Hadamard matrix scaled by 1/sqrt(b) is symmetric and orthogonal, so it is its own
inverse: ``rotate(rotate(x, d), d) == x`` up to rounding, and a GEMM whose contraction dimension is
rotated on both operands computes the same product. Spreading a few large entries (outlier
channels, outlier tokens) over b entries lowers a tensor's absmax about sqrt(b)-fold when those
entries dominate it, which is what makes a per-tensor low-precision grid usable (HALO, QuaRot).

A dimension that is not a power of two gets the block-diagonal rotation whose blocks are the
largest power of two dividing it (704 -> 11 blocks of 64), as the fast transform needs.
"""
from __future__ import annotations

import functools
import math

import torch


def hadamard_block(n: int) -> int:
    """Size of the Hadamard blocks used along a dimension of size ``n``: the largest power of two
    dividing it."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"a Hadamard rotation needs a positive dimension size, got {n!r}")
    return n & -n


MAX_FACTOR = 64  # a block above this is a Kronecker product of Hadamards of at most this size


@functools.lru_cache(maxsize=32)
def _sylvester(size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of a power-of-two ``size``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(size)).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` times the orthonormal block Hadamard matrix along ``dim``, in ``x.dtype``; a second call
    gives ``x`` back (up to rounding).

    A Sylvester H of size a*b is the Kronecker product of those of sizes a and b, so a large block
    is rotated as a few small dense matmuls (one per factor of at most ``MAX_FACTOR``), each on a
    contiguous view (no transposes), which on a CPU beats the log2(b) passes of the butterfly
    transform by far.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    block = hadamard_block(n)
    factors = []
    while block > 1:
        factors.append(min(block, MAX_FACTOR))
        block //= factors[-1]
    factors.reverse()  # the small factor first: the large one then right-multiplies whole rows
    out = x.contiguous()
    inner = math.prod(x.shape[dim + 1:])  # elements after ``dim``
    for j, size in enumerate(factors):
        h = _sylvester(size, out.dtype, str(out.device))
        later = math.prod(factors[j + 1:]) * inner  # the factor's index stride
        if later == 1:  # the last index: right-multiply rows (H is symmetric)
            out = out.reshape(-1, size) @ h
        else:  # a middle index: H times each (size x later) slab
            out = torch.matmul(h, out.reshape(-1, size, later))
    return out.reshape(x.shape)
