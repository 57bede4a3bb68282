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


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_binary_weights_pack_at_one_bit_and_decode_exactly(granularity):
    from components.quant.base import PackedWeights, decode_packed

    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (6, 40), generator=g).float() * 2 - 1
    scales = torch.rand(6, 1, generator=g) + 0.1 if granularity == "per_channel" else torch.tensor(0.37)
    weight = signs * scales
    store = PackedWeights()
    store.add_sign("w", weight, granularity)
    spec = store.tensors["w"]
    assert spec["format"] == "sign" and spec["bits"] == 1
    assert torch.equal(decode_packed(store.packed, "w", spec), weight)
    assert store.packed["w.qweight"].numel() == 6 * 40 // 8  # one bit per weight
    meta = store.meta("test")
    assert meta["bits_per_weight"] == (6 * 40 // 8 + 4 * store.packed["w.scales"].numel()) * 8 / 240


def test_a_binarized_weight_with_exact_zeros_keeps_two_bit_codes_and_an_off_grid_one_is_refused():
    from components.quant.base import PackedWeights, QuantizationError, decode_packed

    weight = torch.tensor([[0.5, -0.5, 0.0, 0.5], [-0.5, 0.5, 0.5, -0.5]])  # sign(0) = 0 left a zero
    store = PackedWeights()
    store.add_sign("w", weight, "per_tensor")
    assert store.tensors["w"]["format"] == "int" and store.tensors["w"]["bits"] == 2
    assert torch.equal(decode_packed(store.packed, "w", store.tensors["w"]), weight)
    with pytest.raises(QuantizationError, match=r"^v is not a binary weight: .* per channel scale by up to 0\.25"):
        PackedWeights().add_sign("v", torch.tensor([[0.5, -0.25], [1.0, 1.0]]), "per_channel")
    with pytest.raises(QuantizationError, match="one scale per tensor or per output channel, not 'group'"):
        PackedWeights().add_sign("v", weight, "group")
