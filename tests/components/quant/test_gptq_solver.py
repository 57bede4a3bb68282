import pytest
import torch

from components.quant.base import QuantizationError, dequantize_packed
from components.quant.gptq_solver import HessianAccumulator, gptq_quantize
from components.quant.packing import pack_int
from components.quant.rtn import quantize_tensor

LAYER_SEEDS = range(5)


def layer(seed, out_features=48, in_features=128, n=512):
    """A random Linear weight and correlated calibration inputs X = Z @ A (H far from diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    mixing = torch.randn(in_features, in_features, generator=gen) / in_features**0.5
    mixing += 0.3 * torch.eye(in_features)
    x = torch.randn(n, in_features, generator=gen) @ mixing
    return weight, x


def hessian_of(x):
    x = x.to(torch.float64)
    return 2.0 / x.shape[0] * x.T @ x


def output_mse(x, weight, quantized):
    return float(((x @ weight.T - x @ quantized.T) ** 2).mean())


def expand(t, in_features):
    return t.to(torch.float32).repeat_interleave(in_features // t.shape[1], dim=1)


def check_format(weight, bits, granularity, group_size, symmetric, result):
    codes, scales, zeros, dequant = result
    out_features, in_features = weight.shape
    rows = 1 if granularity == "per_tensor" else out_features
    groups = in_features // group_size if granularity == "group" else 1
    assert codes.dtype == torch.uint8 and codes.shape == weight.shape
    assert scales.dtype == torch.float16 and scales.shape == (rows, groups)
    assert dequant.dtype == torch.float32 and torch.isfinite(dequant).all()
    assert int(codes.max()) <= 2**bits - 1
    if symmetric:
        assert zeros is None
        assert int(codes.min()) >= 1  # symmetric grid: |q| <= 2**(bits-1) - 1
        zero = torch.full((rows, groups), float(2 ** (bits - 1)))
    else:
        assert zeros.dtype == torch.uint8 and zeros.shape == scales.shape
        assert int(zeros.max()) <= 2**bits - 1
        zero = zeros.float()
    scale_full = expand(scales, in_features).expand(out_features, -1)
    zero_full = expand(zero, in_features).expand(out_features, -1)
    assert torch.equal(dequant, (codes.float() - zero_full) * scale_full)
    # the shared packed-format code reads the same values back
    packed = {"w.qweight": pack_int(codes, bits), "w.scales": scales}
    if zeros is not None:
        packed["w.zeros"] = zeros
    assert torch.equal(dequantize_packed(packed, "w", tuple(weight.shape), bits, 2 ** (bits - 1)), dequant)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", [("per_channel", 128), ("group", 32)])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_every_layer(bits, granularity, group_size, symmetric):
    ratios = []
    for seed in LAYER_SEEDS:
        weight, x = layer(seed)
        # block 48: errors cross block boundaries and groups of 32 straddle blocks
        result = gptq_quantize(weight, hessian_of(x), bits, granularity, group_size, symmetric,
                               block_size=48, name=f"layer{seed}")
        check_format(weight, bits, granularity, group_size, symmetric, result)
        rtn = quantize_tensor(weight, bits, granularity, group_size, symmetric, f"layer{seed}")
        gptq_mse, rtn_mse = output_mse(x, weight, result[3]), output_mse(x, weight, rtn[3])
        ratios.append(gptq_mse / rtn_mse)
    assert max(ratios) < 0.9, ratios


@pytest.mark.parametrize("granularity,group_size", [("per_channel", 128), ("group", 32)])
def test_act_order_valid_and_beats_rtn(granularity, group_size):
    for seed in LAYER_SEEDS:
        weight, x = layer(seed)
        # give the inputs very different scales so the order is far from the natural one
        x = x * torch.linspace(0.2, 3.0, weight.shape[1])[torch.randperm(weight.shape[1],
                                                          generator=torch.Generator().manual_seed(seed))]
        h = hessian_of(x)
        result = gptq_quantize(weight, h, 4, granularity, group_size, False, act_order=True,
                               name=f"layer{seed}")
        check_format(weight, 4, granularity, group_size, False, result)
        rtn = quantize_tensor(weight, 4, granularity, group_size, False, f"layer{seed}")
        assert output_mse(x, weight, result[3]) < 0.9 * output_mse(x, weight, rtn[3])
        if granularity == "group":
            # static groups: the scales are exactly RTN's, from the original weights in natural order
            assert torch.equal(result[1], rtn[1]) and torch.equal(result[2], rtn[2])


@pytest.mark.parametrize("bits", [1, 2, 5, 6, 8])
def test_other_bit_widths_valid_and_no_worse_than_rtn(bits):
    weight, x = layer(7, out_features=16, in_features=64)
    symmetric = bits > 1
    result = gptq_quantize(weight, hessian_of(x), bits, "group", 16, symmetric, name="w")
    check_format(weight, bits, "group", 16, symmetric, result)
    if bits > 1:  # a 1-bit grid ({0, step} per group) is too coarse for the comparison to mean much
        rtn = quantize_tensor(weight, bits, "group", 16, symmetric, "w")
        assert output_mse(x, weight, result[3]) < output_mse(x, weight, rtn[3])


def test_per_tensor_one_scale_from_original_weight():
    weight, x = layer(0)
    result = gptq_quantize(weight, hessian_of(x), 4, "per_tensor", 128, True, name="t")
    check_format(weight, 4, "per_tensor", 128, True, result)
    rtn = quantize_tensor(weight, 4, "per_tensor", 128, True, "t")
    assert torch.equal(result[1], rtn[1])
    assert output_mse(x, weight, result[3]) < output_mse(x, weight, rtn[3])


def test_dynamic_groups_refit_from_updated_weights_and_static_option():
    weight, x = layer(1)
    h = hessian_of(x)
    rtn = quantize_tensor(weight, 4, "group", 32, True, "w")
    dynamic = gptq_quantize(weight, h, 4, "group", 32, True, name="w")
    static = gptq_quantize(weight, h, 4, "group", 32, True, static_groups=True, name="w")
    assert torch.equal(dynamic[1][:, 0], rtn[1][:, 0])  # the first group sees no updates yet
    assert not torch.equal(dynamic[1][:, 1:], rtn[1][:, 1:])
    assert torch.equal(static[1], rtn[1])
    check_format(weight, 4, "group", 32, True, static)


def test_block_size_does_not_change_the_result():
    # lazy batch updates are exact: same codes whether blocks hold 1, 20, 32 or all columns,
    # including groups that start inside a block or span two blocks (block 20 vs group 32)
    weight, x = layer(2, out_features=16, in_features=64)
    h = hessian_of(x)
    for granularity in ("per_channel", "group"):
        reference = gptq_quantize(weight, h, 4, granularity, 32, True, block_size=64)
        for block_size in (1, 20, 32):
            other = gptq_quantize(weight, h, 4, granularity, 32, True, block_size=block_size)
            mismatch = (other[0] != reference[0]).float().mean()
            assert mismatch < 0.002, (granularity, block_size, float(mismatch))
            assert torch.allclose(other[3], reference[3], atol=2 * float(reference[1].float().max()))


def test_matches_naive_obs_reference():
    # the paper's unblocked form: explicit inverse Hessian, row/column i eliminated after
    # quantizing column i (Eq. 3 / Alg. 1 without Cholesky or lazy batches), in float64
    weight, x = layer(6, out_features=16, in_features=64)
    h = hessian_of(x)
    codes, scales, _, _ = gptq_quantize(weight, h, 4, "per_channel", 128, True, block_size=16)
    step = scales.double()
    w = weight.double().clone()
    hinv = torch.linalg.inv(h + 0.01 * torch.diagonal(h).mean() * torch.eye(64, dtype=h.dtype))
    ref_codes = torch.empty(16, 64)
    for i in range(64):
        q = torch.clamp(torch.round(w[:, i:i + 1] / step), -7, 7)
        ref_codes[:, i] = q[:, 0] + 8
        err = (w[:, i:i + 1] - q * step) / hinv[i, i]
        w -= err * hinv[i:i + 1, :]
        hinv -= hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    assert (codes.float() != ref_codes).float().mean() < 0.005


def test_unit_hessian_equals_rtn():
    # with H = I there is no correlation to exploit: the error updates vanish and GPTQ is RTN
    weight, _ = layer(3, out_features=16, in_features=64)
    for granularity in ("per_channel", "group"):
        result = gptq_quantize(weight, torch.eye(64), 4, granularity, 16, False, damp=0.0)
        rtn = quantize_tensor(weight, 4, granularity, 16, False, "w")
        for a, b in zip(result, rtn):
            assert torch.equal(a, b)


def test_hessian_accumulator_matches_batch_formula():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 24, generator=gen), torch.randn(5, 24, generator=gen),
               torch.randn(0, 24), torch.randn(2, 11, 24, generator=gen)]
    acc = HessianAccumulator(24)
    for b in batches:
        acc.add(b)
    x = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert acc.n_samples == x.shape[0] == 21 + 5 + 22
    expected = 2.0 / x.shape[0] * x.T @ x
    assert acc.hessian.dtype == torch.float64
    assert torch.allclose(acc.hessian, expected, rtol=1e-12, atol=1e-12)
    # forward-hook form on a real Linear
    linear = torch.nn.Linear(24, 8)
    hooked = HessianAccumulator(24, dtype=torch.float32)
    handle = linear.register_forward_hook(hooked.hook)
    for b in batches:
        linear(b)
    handle.remove()
    assert torch.allclose(hooked.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_hessian_accumulator_rejects_bad_input():
    acc = HessianAccumulator(8, name="blk.q_proj")
    with pytest.raises(QuantizationError, match="blk.q_proj.*in_features=8"):
        acc.add(torch.randn(4, 9))
    with pytest.raises(QuantizationError, match="blk.q_proj.*non-finite"):
        acc.add(torch.tensor([[float("nan")] * 8]))
    assert acc.n_samples == 0 and not acc.hessian.any()


def test_dead_columns_are_zeroed():
    weight, x = layer(4, out_features=16, in_features=64)
    dead = [5, 17, 40]
    x[:, dead] = 0.0
    h = hessian_of(x)
    assert (torch.diagonal(h)[dead] == 0).all()
    for act_order in (False, True):
        codes, scales, zeros, dequant = gptq_quantize(weight, h, 4, "group", 16, False,
                                                      act_order=act_order, name="w")
        assert torch.isfinite(dequant).all()
        assert torch.equal(dequant[:, dead], torch.zeros(16, len(dead)))
        assert output_mse(x, weight, dequant) < output_mse(
            x, weight, quantize_tensor(weight, 4, "group", 16, False, "w")[3])
    # inputs were not modified
    assert weight[:, dead].abs().sum() > 0 and h[5, 5] == 0


def test_non_pd_hessian_retries_with_more_damping():
    weight, x = layer(5, out_features=8, in_features=32, n=512)
    h = hessian_of(x)
    mean_diag = float(torch.diagonal(h).mean())
    # shift so the smallest eigenvalue is -0.002 * mean(diag): Cholesky fails without damping,
    # succeeds at the first retry (damp 0.01)
    h -= (float(torch.linalg.eigvalsh(h)[0]) + 0.002 * mean_diag) * torch.eye(32, dtype=h.dtype)
    assert torch.linalg.cholesky_ex(h).info != 0
    with pytest.warns(RuntimeWarning, match="w: .*succeeded with damp=0.01"):
        result = gptq_quantize(weight, h, 4, "per_channel", 128, True, damp=0.0, name="w")
    check_format(weight, 4, "per_channel", 128, True, result)


def test_indefinite_hessian_raises_naming_layer():
    weight, _ = layer(0, out_features=8, in_features=32)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.*not positive definite"):
        gptq_quantize(weight, -torch.eye(32), 4, "per_channel", name="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=9), "L7.*bits=9"),
    (dict(bits=1, symmetric=True), "L7.*symmetric.*bits=1"),
    (dict(bits=4, granularity="group", group_size=48), "L7.*group_size=48.*128"),
    (dict(bits=4, granularity="per_row"), "L7.*'per_row'"),
    (dict(bits=4, hessian=torch.eye(64)), r"L7.*\(64, 64\).*\(128, 128\)"),
    (dict(bits=4, weight_nan=True), "L7.*weight.*non-finite"),
    (dict(bits=4, hessian_inf=True), "L7.*Hessian.*non-finite"),
    (dict(bits=4, damp=-0.1), "L7.*damp"),
    (dict(bits=4, block_size=0), "L7.*block_size"),
])
def test_errors_name_layer_and_value(kwargs, message):
    weight, x = layer(0, out_features=8)
    h = kwargs.pop("hessian", hessian_of(x))
    if kwargs.pop("weight_nan", False):
        weight[2, 3] = float("nan")
    if kwargs.pop("hessian_inf", False):
        h[3, 4] = float("inf")
    with pytest.raises(QuantizationError, match=message):
        gptq_quantize(weight, h, name="L7", **kwargs)
