import dataclasses
import math

import pytest
import torch

from components.quant.minifloat import (
    BF16, E2M1, E2M3, E3M2, E4M3, E5M2, MinifloatFakeQuantizer, MinifloatFormat, decode, encode,
    from_name, minifloat_fake_quant, minifloat_quantize, round_to_format)

TORCH_CASTS = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2), (BF16, torch.bfloat16)]
FP8_CASTS = TORCH_CASTS[:2]


def all_bf16_values() -> torch.Tensor:
    """Every one of the 2**16 bf16 bit patterns, as fp32 (includes ±0, subnormals, ±inf, NaNs)."""
    return torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()


def grid(fmt) -> torch.Tensor:
    """The format's non-negative finite values, sorted (from all codes, or from bf16 for BF16)."""
    v = all_bf16_values() if fmt is BF16 else decode(torch.arange(2**fmt.bits), fmt)
    return torch.unique(v[torch.isfinite(v) & (v >= 0)])


def sweep(fmt) -> torch.Tensor:
    """Dense fp32 probe: random bit patterns, log-uniform values in and around the format's range,
    exact ties between neighbours and their fp32 neighbours, and the special values."""
    gen = torch.Generator().manual_seed(fmt.bits * 31 + fmt.exp_bits)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int32)
    lo, hi = math.log2(fmt.min_subnormal) - 3, math.log2(fmt.max_value) + 3
    logu = torch.exp2(torch.empty(200_000).uniform_(lo, hi, generator=gen))
    g = grid(fmt)
    mids = (g[:-1] + g[1:]) / 2  # exact in fp32: neighbours differ in few low bits
    above = torch.cat([g[-1:] + (g[-1] - g[-2]) / 2, g[-1:] * 2])  # overflow tie and beyond
    ties = torch.cat([mids, above])
    ties = torch.cat([ties, torch.nextafter(ties, torch.tensor(math.inf)),
                      torch.nextafter(ties, torch.tensor(0.0)), g])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 3.4e38, 1e-45,
                            -1e-45, 1.1754942e-38, 1.0, -1.0])
    x = torch.cat([bits.view(torch.float32), logu, ties, special])
    return torch.cat([x, -x])


def assert_same_floats(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-level agreement up to NaN payloads: equal values, NaN where NaN, same sign of zero."""
    assert y.dtype == ref.dtype == torch.float32
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan)
    bad = ~nan & (y != ref)
    assert not bad.any(), (f"{int(bad.sum())} mismatches, e.g. {y[bad][:4].tolist()} "
                           f"vs {ref[bad][:4].tolist()}")
    assert torch.equal(torch.signbit(y[~nan]), torch.signbit(ref[~nan]))


# --------------------------------------------------------------------------- formats


def test_preset_formats():
    expected = {  # name: (bits, bias, max, min subnormal)
        "e4m3": (8, 7, 448.0, 2.0**-9), "e5m2": (8, 15, 57344.0, 2.0**-16),
        "e2m1": (4, 1, 6.0, 0.5), "e3m2": (6, 3, 28.0, 0.0625), "e2m3": (6, 1, 7.5, 0.125),
        "bf16": (16, 127, float(torch.finfo(torch.bfloat16).max), 2.0**-133),
    }
    for fmt in (E4M3, E5M2, E2M1, E3M2, E2M3, BF16):
        assert (fmt.bits, fmt.bias, fmt.max_value, fmt.min_subnormal) == expected[fmt.name], fmt.name
        assert from_name(fmt.name) is fmt
    assert E4M3.max_value == float(torch.finfo(torch.float8_e4m3fn).max)
    assert E5M2.max_value == float(torch.finfo(torch.float8_e5m2).max)
    assert E4M3.min_normal == float(torch.finfo(torch.float8_e4m3fn).tiny)
    with pytest.raises(dataclasses.FrozenInstanceError):
        E4M3.man_bits = 2


def test_from_name_aliases_and_generic():
    assert from_name("FP4") is E2M1 and from_name("bfloat16") is BF16
    assert from_name("float8_e4m3fn") is E4M3 and from_name("fp8_e5m2") is E5M2
    e3m4 = from_name("e3m4")
    assert (e3m4.exp_bits, e3m4.man_bits, e3m4.bias, e3m4.name) == (3, 4, 3, "e3m4")
    assert e3m4.max_value == 31.0  # all-finite: top binade 2**4 * (2 - 2**-4)
    with pytest.raises(ValueError, match="unknown minifloat format 'int4'"):
        from_name("int4")


def test_e2m1_values_and_rounding():
    assert decode(torch.arange(8), E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert decode(torch.arange(8, 16), E2M1).tolist() == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    x = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 5.01, 7.0, 1e9, math.inf, -math.inf, -0.2])
    # ties go to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 2.5->2, 3.5->4, 5->4; saturate at 6
    expected = [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -6.0, -0.0]
    y = round_to_format(x, E2M1)
    assert y.tolist() == expected
    assert torch.signbit(y[-1])


# --------------------------------------------------------------------------- bit-exact vs torch casts


@pytest.mark.parametrize("fmt,dtype", TORCH_CASTS, ids=lambda v: getattr(v, "name", str(v)))
def test_bit_exact_on_all_bf16_values(fmt, dtype):
    x = all_bf16_values()
    assert_same_floats(round_to_format(x, fmt), x.to(dtype).float())


@pytest.mark.parametrize("fmt,dtype", TORCH_CASTS, ids=lambda v: getattr(v, "name", str(v)))
def test_bit_exact_on_dense_fp32_sweep(fmt, dtype):
    x = sweep(fmt)
    y = round_to_format(x, fmt)
    assert_same_floats(y, x.to(dtype).float())
    inside = (x.abs() > fmt.min_subnormal) & (x.abs() < fmt.max_value)
    assert inside.sum() > 100_000  # the sweep really exercises the format's range


def test_torch_overflow_semantics_are_what_the_presets_assume():
    big = torch.tensor([480.0, 1e6, math.inf, -math.inf, 61440.0, math.nan])
    assert torch.isnan(big.to(torch.float8_e4m3fn).float()[-1])
    assert big.to(torch.float8_e4m3fn).float()[:4].tolist() == [448.0, 448.0, 448.0, -448.0]  # saturating
    assert big.to(torch.float8_e5m2).float()[1:5].tolist() == [math.inf, math.inf, -math.inf, math.inf]
    assert E4M3.saturate and not E5M2.saturate and E5M2.has_inf and not E4M3.has_inf


def test_non_saturating_variants():
    x = torch.tensor([448.0, 463.9, 464.0, 480.0, math.inf, -1e5])
    ocp = minifloat_quantize(x, 4, 3, saturate=False)  # OCP E4M3 non-saturating: overflow is NaN
    assert ocp[:3].tolist() == [448.0, 448.0, 448.0] and torch.isnan(ocp[3:]).all()
    ieee = minifloat_quantize(x, 4, 3, has_inf=True, saturate=False)  # IEEE-style E4M3: max 240
    assert ieee.tolist() == [math.inf, math.inf, math.inf, math.inf, math.inf, -math.inf]
    sat = minifloat_quantize(x, 5, 2, has_inf=True, saturate=True)
    assert sat.tolist() == [448.0, 448.0, 448.0, 512.0, 57344.0, -57344.0]
    same = minifloat_quantize(sweep(E5M2), 5, 2, has_inf=True, saturate=False)
    assert_same_floats(same, round_to_format(sweep(E5M2), E5M2))


# --------------------------------------------------------------------------- codes


@pytest.mark.parametrize("fmt,dtype", FP8_CASTS, ids=lambda v: getattr(v, "name", str(v)))
def test_decode_all_codes_matches_torch(fmt, dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert_same_floats(decode(codes, fmt), codes.view(dtype).float())


@pytest.mark.parametrize("fmt,dtype", FP8_CASTS, ids=lambda v: getattr(v, "name", str(v)))
def test_encode_matches_torch_codes(fmt, dtype):
    x = torch.cat([sweep(fmt), all_bf16_values()])
    codes = encode(x, fmt)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, x.to(dtype).view(torch.uint8))
    assert_same_floats(decode(codes, fmt), round_to_format(x, fmt))


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1, E3M2, E2M3], ids=lambda f: f.name)
def test_encode_decode_round_trip_on_every_code(fmt):
    codes = torch.arange(2**fmt.bits, dtype=torch.int32).to(torch.uint8)
    values = decode(codes, fmt)
    nan = torch.isnan(values)
    again = encode(values, fmt)
    assert torch.equal(again[~nan], codes[~nan])
    assert torch.equal(decode(again, fmt)[~nan], values[~nan])
    # NaN codes re-encode to the canonical all-ones code of the same sign
    top = 2 ** (fmt.bits - 1) - 1
    assert set(again[nan].tolist()) <= {top, 2 * top + 1}


def test_code_errors():
    with pytest.raises(ValueError, match="bf16 has 16 bits"):
        encode(torch.ones(2), BF16)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        decode(torch.tensor([3, 16]), E2M1)
    with pytest.raises(ValueError, match="integer tensor"):
        decode(torch.tensor([1.0]), E2M1)
    with pytest.raises(ValueError, match="no NaN code"):
        encode(torch.tensor([1.0, math.nan]), E2M1)


# --------------------------------------------------------------------------- fake quant + scaling


def test_fake_quant_without_scaling_is_the_cast_with_clipped_ste():
    x = torch.tensor([0.1, -3.3, 300.0, 500.0, -1e4], requires_grad=True)
    y = minifloat_fake_quant(x, "e4m3")
    assert torch.equal(y.detach(), x.detach().to(torch.float8_e4m3fn).float())
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # saturated inputs get no gradient


def test_block_scaling_float_maps_block_absmax_to_max():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen) * torch.logspace(-3, 3, 8).unsqueeze(1)
    for fmt in (E4M3, E2M1):
        y = minifloat_fake_quant(x, fmt, block_size=16)
        amax = x.reshape(8, 4, 16).abs().amax(-1)
        assert torch.allclose(y.reshape(8, 4, 16).abs().amax(-1), amax, rtol=1e-6)
        levels = (y.reshape(-1, 16) / (amax.reshape(-1, 1) / fmt.max_value))
        assert torch.allclose(levels, round_to_format(levels, fmt), rtol=1e-5, atol=1e-6)
    # rows differ by 10**6: one scale for the whole tensor flushes the small row to zero,
    # per-block scales keep it
    def rel_err(y):
        return ((y[0] - x[0]).norm() / x[0].norm()).item()
    assert rel_err(minifloat_fake_quant(x, E2M1, scale_granularity="per_tensor")) == 1.0
    assert rel_err(minifloat_fake_quant(x, E2M1, block_size=16)) < 0.3
    assert rel_err(minifloat_fake_quant(x, E2M1, scale_granularity="per_channel")) < 0.3


def test_block_scaling_pow2_is_ocp_mx():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=gen) * 3
    y = minifloat_fake_quant(x, E2M1, block_size=32, scale_kind="pow2")
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)  # E2M1 emax = 2
    v = y / scale
    assert torch.equal(v, round_to_format(v, E2M1))  # every element is an E2M1 value times 2**k
    assert torch.equal(v, round_to_format((x / scale).clamp(-6, 6), E2M1))


def test_block_scaling_gradients_and_dtype():
    x = torch.tensor([[0.5, -8.0, 1.0, 2.0]], requires_grad=True)
    minifloat_fake_quant(x, E2M1, block_size=4).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # float scales keep every element in range
    x.grad = None
    y = minifloat_fake_quant(x, E2M1, block_size=4, scale_kind="pow2")  # scale 2**(3-2)=2
    y.sum().backward()
    assert y.detach().tolist() == [[0.0, -8.0, 1.0, 2.0]]  # 0.5/2 = 0.25 ties to even (0)
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    w = torch.tensor([[7.9, 0.1]], requires_grad=True)  # scale 2**(2-2) = 1
    minifloat_fake_quant(w, E2M1, block_size=2, scale_kind="pow2").sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0]]  # 7.9 / 1 > 6: saturated by the power-of-two scale
    b = torch.randn(2, 8, dtype=torch.bfloat16)
    assert minifloat_fake_quant(b, "e4m3", block_size=8).dtype == torch.bfloat16
    t = torch.tensor([[[10.0, 1.0]], [[0.3, 0.0]]])
    assert torch.allclose(minifloat_fake_quant(t, "e2m1", scale_granularity="per_token"),
                          torch.tensor([[[10.0, 0.5 * 10 / 6]], [[0.3, 0.0]]]))  # 1 / (10/6) = 0.6 -> 0.5


def test_zero_block_and_module():
    x = torch.zeros(2, 8)
    x[1] = torch.linspace(-1, 1, 8)
    y = minifloat_fake_quant(x, E3M2, block_size=4)
    assert torch.equal(y[0], torch.zeros(8)) and torch.isfinite(y).all()
    module = MinifloatFakeQuantizer("e3m2", block_size=4)
    assert torch.equal(module(x), y)
    assert "e3m2" in repr(module)


@pytest.mark.parametrize("kwargs,match", [
    (dict(exp_bits=0, man_bits=3), "exp_bits"),
    (dict(exp_bits=4, man_bits=24), "man_bits"),
    (dict(exp_bits=4, man_bits=3, has_inf=True, nan_encoding="ocp"), "has_inf=True"),
    (dict(exp_bits=4, man_bits=3, nan_encoding="none", saturate=False), "must saturate"),
    (dict(exp_bits=4, man_bits=3, nan_encoding="weird"), "nan_encoding"),
    (dict(exp_bits=8, man_bits=7, bias=100), "beyond fp32"),
])
def test_format_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MinifloatFormat(**kwargs)


def test_fake_quant_argument_errors():
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="block_size=5"):
        minifloat_fake_quant(x, E4M3, block_size=5)
    with pytest.raises(ValueError, match="block_size=None"):
        minifloat_fake_quant(x, E4M3, scale_granularity="block")
    with pytest.raises(ValueError, match="scale_kind"):
        minifloat_fake_quant(x, E4M3, block_size=4, scale_kind="e8m0")
    with pytest.raises(ValueError, match="scale_granularity 'rows'"):
        minifloat_fake_quant(x, E4M3, scale_granularity="rows")
