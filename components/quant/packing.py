"""Bit-packing of unsigned integer codes into uint8 storage.

2/4/8-bit codes pack 8/bits codes per byte (lowest bits first). 3-bit codes pack 8 codes into
3 bytes (24 bits), so the stored size is exactly ceil(numel / 8) * 3 bytes: no 4-bit fallback.
The element count is not stored; callers keep it (the quantized tensor's shape gives it).
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; supported bits: {list(SUPPORTED_BITS)}")


def packed_numel(numel: int, bits: int) -> int:
    """How many bytes ``pack_int`` produces for ``numel`` codes."""
    _check_bits(bits)
    if bits == 3:
        return -(-numel // 8) * 3
    per_byte = 8 // bits
    return -(-numel // per_byte)


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
    group = 8 if bits == 3 else 8 // bits  # codes per packing unit
    pad = (-flat.numel()) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    units = flat.reshape(-1, group).to(torch.int32)
    shifts = torch.arange(group, dtype=torch.int32) * bits
    words = (units << shifts).sum(dim=1)  # 24 bits for 3-bit, 8 bits otherwise
    if bits == 3:
        byte_shifts = torch.tensor([0, 8, 16], dtype=torch.int32)
        return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return words.to(torch.uint8)


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
    group = 8 if bits == 3 else 8 // bits
    if bits == 3:
        triples = packed.reshape(-1, 3).to(torch.int32)
        words = (triples << torch.tensor([0, 8, 16], dtype=torch.int32)).sum(dim=1)
    else:
        words = packed.reshape(-1).to(torch.int32)
    shifts = torch.arange(group, dtype=torch.int32) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
