"""Bit-packing of unsigned integer codes into uint8 storage.

Codes of ``bits`` (1..8) bits form one little-endian bit stream: code ``i`` occupies bits
``[i*bits, (i+1)*bits)`` and each byte holds the lowest stream bits first. So 2/4-bit codes pack
8/bits per byte (lowest bits first), 3- and 6-bit codes pack 8 and 4 codes into 3 bytes, and
the stored size is exactly ``ceil(numel * bits / 8)`` rounded up to a whole packing unit: no
wider fallback. The element count is not stored; callers keep it (the tensor's shape gives it).
"""
from __future__ import annotations

from math import gcd

import torch

# Set on a model's config once its weights hold dequantized values: quantizing twice would
# silently compound rounding error, so quantizers refuse such models. Here, beside the packed
# format, so a training stage can clear it without base.py's quantizers in its code closure.
QUANT_CONFIG_ATTR = "paperdag_quantization"

SUPPORTED_BITS = tuple(range(1, 9))


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; supported bits: {list(SUPPORTED_BITS)}")


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte packing unit."""
    g = gcd(bits, 8)
    return 8 // g, bits // g


def packed_numel(numel: int, bits: int) -> int:
    """How many bytes ``pack_int`` produces for ``numel`` codes."""
    _check_bits(bits)
    codes, nbytes = _unit(bits)
    return -(-numel // codes) * nbytes


def pack_int(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, each < 2**bits) into a flat uint8 tensor."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_int expects uint8 codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits (max {2**bits - 1})")
    if bits == 8:
        return flat.clone()
    per_unit, nbytes = _unit(bits)
    pad = (-flat.numel()) % per_unit
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    units = flat.reshape(-1, per_unit).to(torch.int64)  # a unit is at most 56 bits (7-bit codes)
    words = (units << (torch.arange(per_unit, dtype=torch.int64) * bits)).sum(dim=1)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_int(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_int``: the first ``numel`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int expects uint8 input, got {packed.dtype}")
    expected = packed_numel(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} {bits}-bit codes "
                         f"(expected {expected} bytes)")
    if bits == 8:
        return packed.reshape(-1).clone()
    per_unit, nbytes = _unit(bits)
    units = packed.reshape(-1, nbytes).to(torch.int64)
    words = (units << (torch.arange(nbytes, dtype=torch.int64) * 8)).sum(dim=1)
    shifts = torch.arange(per_unit, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
