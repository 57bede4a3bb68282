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

import math

import torch


def hadamard_block(n: int) -> int:
    """Size of the Hadamard blocks used along a dimension of size ``n``: the largest power of two
    dividing it."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"a Hadamard rotation needs a positive dimension size, got {n!r}")
    return n & -n


def rotate(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` times the orthonormal block Hadamard matrix along ``dim`` (fast transform, O(n log b)).

    Computed in ``x.dtype``; the result is exactly ``x`` again after a second call (up to rounding).
    """
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    block = hadamard_block(n)
    out = moved.reshape(-1, n // block, block)
    half = 1
    while half < block:  # one butterfly stage per bit: pairs (i, i + half) -> (a + b, a - b)
        pairs = out.reshape(out.shape[0], out.shape[1], block // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        out = torch.stack((a + b, a - b), dim=-2).reshape(out.shape)
        half *= 2
    out = out * (1.0 / math.sqrt(block))
    return out.reshape(moved.shape).movedim(-1, dim)
