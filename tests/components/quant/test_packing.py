import pytest
import torch

from components.quant.packing import pack_int, packed_numel, unpack_int


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [1, 7, 13, 1001])
def test_round_trip_exact_with_odd_numel(bits, numel):
    gen = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=gen).to(torch.uint8)
    packed = pack_int(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(numel, bits)
    assert torch.equal(unpack_int(packed, bits, numel), codes)


def test_packed_sizes_are_dense():
    assert packed_numel(16, 2) == 4
    assert packed_numel(16, 3) == 6  # 8 codes in 3 bytes, no 4-bit fallback
    assert packed_numel(17, 3) == 9
    assert packed_numel(16, 4) == 8
    assert packed_numel(16, 8) == 16
    assert packed_numel(16, 6) == 12  # 4 codes in 3 bytes
    assert packed_numel(9, 5) == 10  # 8 codes in 5 bytes


def test_bit_stream_layout_6bit():
    # codes 1, 2, 3, 4 -> stream 000001 000010 000011 000100 (LSB first) = 0x1030C1... as bytes
    packed = pack_int(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 6)
    word = sum(int(b) << (8 * i) for i, b in enumerate(packed.tolist()))
    assert word == 1 | 2 << 6 | 3 << 12 | 4 << 18


def test_known_layout_4bit_low_nibble_first():
    packed = pack_int(torch.tensor([0x1, 0xF, 0x3], dtype=torch.uint8), 4)
    assert packed.tolist() == [0xF1, 0x03]


def test_multidimensional_codes_flatten_row_major():
    codes = torch.arange(12, dtype=torch.uint8).reshape(3, 4) % 8
    assert torch.equal(unpack_int(pack_int(codes, 3), 3, 12), codes.reshape(-1))


def test_errors():
    with pytest.raises(ValueError, match=r"unsupported bit width 9; supported bits: \[1, 2, 3, 4, 5, 6, 7, 8\]"):
        pack_int(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_int(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack_int(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot hold exactly 9"):
        unpack_int(torch.zeros(3, dtype=torch.uint8), 3, 9)
