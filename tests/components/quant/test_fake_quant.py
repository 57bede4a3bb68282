import math

import pytest
import torch

from components.quant.fake_quant import (
    IntFakeQuantizer, LsqQuantizer, binarize, fake_quant_int, fixed_point, int_range, int_scale_zero,
    quantize_int, round_ste, straight_through, ternarize)

GRANULARITIES = ["per_tensor", "per_channel", "group", "per_token"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_round_ste_rounds_half_to_even_with_identity_gradient():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.7, -0.2], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 1.0, -0.0]
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0))


def test_straight_through_is_exact_where_the_detach_trick_is_not():
    x = torch.tensor([1e9 + 64, math.inf, -1e-30], requires_grad=True)
    q = torch.tensor([448.0, 448.0, -0.0])
    y = straight_through(x, q, torch.tensor([False, False, True]))
    assert y.tolist() == [448.0, 448.0, -0.0] and torch.signbit(y[2])
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_fake_quant_error_within_half_step(granularity, symmetric, bits):
    x = randn(16, 64, seed=bits) * torch.linspace(0.1, 10, 16).unsqueeze(1) + 0.3
    scale, zero = int_scale_zero(x, bits, symmetric, granularity, group_size=16)
    y = fake_quant_int(x, scale, zero, bits, symmetric)
    assert torch.all((y - x).abs() <= scale / 2 * (1 + 1e-5))
    codes = y / scale - (0 if zero is None else -zero)  # integers on the grid
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    qmin, qmax = int_range(bits, symmetric)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    assert torch.equal(quantize_int(x, bits, symmetric, granularity, 16), y)
    if not symmetric:
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**bits - 1


def test_asymmetric_uses_all_levels_on_nonnegative_data():
    x = torch.linspace(0, 3, 1000).reshape(1, -1)  # ReLU-like activations
    y = quantize_int(x, 3, symmetric=False, granularity="per_token")
    assert torch.unique(y).numel() == 8 and y.min() == 0.0
    assert torch.unique(quantize_int(x, 3, symmetric=True, granularity="per_token")).numel() == 4


def test_scale_shapes_per_granularity():
    w = randn(6, 32)
    s, z = int_scale_zero(w, 4, True, "per_tensor")
    assert s.shape == (1, 1) and z is None
    assert torch.allclose(s, w.abs().max() / 7)
    s, _ = int_scale_zero(w, 4, True, "per_channel")
    assert s.shape == (6, 1) and torch.allclose(s[:, 0], w.abs().amax(1) / 7)
    s, z = int_scale_zero(w, 4, False, "group", group_size=8)
    assert s.shape == z.shape == (6, 32)
    per_group = s.reshape(6, 4, 8)
    assert torch.equal(per_group, per_group[..., :1].expand(-1, -1, 8))  # constant within a group
    g = w.reshape(6, 4, 8)
    expected = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / 15
    assert torch.allclose(per_group[..., 0], expected)
    act = randn(2, 5, 32)
    s, _ = int_scale_zero(act, 8, True, "per_token")
    assert s.shape == (2, 5, 1) and torch.allclose(s[..., 0], act.abs().amax(-1) / 127)
    s, _ = int_scale_zero(randn(4, 3, 3, 3), 8, True, "per_channel")  # conv weight
    assert s.shape == (4, 1, 1, 1)


def test_group_scales_follow_group_size():
    w = torch.ones(2, 8)
    w[0, 0] = 14.0  # only group 0 of row 0 has a large value
    y = quantize_int(w, 4, granularity="group", group_size=4)
    assert torch.equal(y[0, 4:], torch.ones(4)) and torch.equal(y[1], torch.ones(8))
    assert y[0, :4].tolist() == [14.0, 0.0, 0.0, 0.0]  # step 2 there: 1 / 2 = 0.5 ties to 0


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("symmetric", [True, False])
def test_int_ste_gradient_is_one_inside_the_range(symmetric):
    x = randn(8, 32).requires_grad_()
    quantize_int(x, 4, symmetric, "per_channel").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_clipped_values_get_no_gradient():
    x = torch.tensor([[-4.0, -1.0, 0.3, 2.0, 4.0]], requires_grad=True)
    y = quantize_int(x, 4, granularity="per_token", clip_ratio=0.5)  # range ±2, step 2/7
    assert y[0, 0].item() == pytest.approx(-2.0) and y[0, -1].item() == pytest.approx(2.0)
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_scale_gradient_is_the_lsq_gradient():
    x = torch.tensor([0.3, -1.2, 5.0, -4.0])  # x / s = [0.6, -2.4, 10, -8] on the grid ±3
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant_int(x, s, None, bits=3, symmetric=True).sum().backward()
    # d/ds of clamp(round(x/s)) * s: round(v) - v inside, the bound outside
    assert s.grad.item() == pytest.approx((1 - 0.6) + (-2 + 2.4) + 3 - 3)


def test_bf16_inputs_stay_bf16():
    x = randn(4, 16).to(torch.bfloat16).requires_grad_()
    y = quantize_int(x, 8, granularity="group", group_size=8)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- LSQ


def test_lsq_initialisation_and_grid():
    x = randn(64, 64)
    x[0, :2] = torch.tensor([-100.0, 100.0])
    lsq = LsqQuantizer(bits=4)
    y = lsq(x)
    step = lsq.step.item()
    assert step == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    codes = y.detach() / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() == -8 and codes.round().max() == 7  # full signed range
    lsq(x * 100)  # later calls keep the learned step
    assert lsq.step.item() == step
    assert lsq.initialized.item() and "initialized" in lsq.state_dict()


def test_lsq_step_gradient_is_scaled():
    x = randn(32, 32)
    lsq = LsqQuantizer(bits=3)
    lsq(x)
    lsq(x).sum().backward()
    step = lsq.step.detach().clone().requires_grad_()
    fake = torch.clamp(x / step, -4, 3)
    (((fake.round() - fake).detach() + fake) * step).sum().backward()  # the unscaled LSQ gradient
    g = 1 / math.sqrt(x.numel() * 3)
    assert lsq.step.grad.item() != 0
    assert lsq.step.grad.item() == pytest.approx(step.grad.item() * g, rel=1e-4)


def test_lsq_training_reduces_mse():
    x = randn(4096)
    lsq = LsqQuantizer(bits=4)
    lsq(x)
    opt = torch.optim.Adam(lsq.parameters(), lr=0.02)
    before = (lsq(x) - x).pow(2).mean().item()
    for _ in range(40):
        opt.zero_grad()
        loss = (lsq(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
    after = (lsq(x) - x).pow(2).mean().item()
    assert after < 0.8 * before


def test_lsq_per_channel_and_unsigned():
    w = randn(4, 16) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    lsq = LsqQuantizer(bits=8, channels=4)
    y = lsq(w)
    assert lsq.step.shape == (4,)
    assert torch.allclose(lsq.step, 2 * w.abs().mean(1) / math.sqrt(127))
    assert ((y - w).abs() <= lsq.step.detach().unsqueeze(1) / 2 + 1e-7).all()
    relu = LsqQuantizer(bits=2, signed=False)
    out = relu(torch.tensor([-1.0, 0.0, 0.5, 1.0, 100.0]))
    assert out.min().item() == 0 and out.max().item() == pytest.approx(3 * relu.step.item())
    with pytest.raises(ValueError, match=r"channels=4\) needs x of shape \[4"):
        lsq(randn(3, 16))


# --------------------------------------------------------------------------- binary / ternary / fixed


def test_binarize():
    x = randn(5, 12).requires_grad_()
    y = binarize(x)
    alpha = x.detach().abs().mean(1, keepdim=True)
    assert torch.equal(y.abs(), alpha.expand_as(y))
    assert torch.equal(torch.sign(y), torch.where(x >= 0, 1.0, -1.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    z = binarize(torch.tensor([[0.0, -2.0], [1.0, 3.0]]), dim=None)  # one scale: mean|x| = 1.5
    assert z.tolist() == [[1.5, -1.5], [1.5, 1.5]]


def test_ternarize():
    x = randn(6, 32).requires_grad_()
    y = ternarize(x)
    s = x.detach().abs().mean(1, keepdim=True)
    levels = y.detach() / s
    assert set(torch.unique(levels).tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(levels, torch.round(torch.clamp(x.detach() / s, -1, 1)))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(ternarize(torch.zeros(2, 4)), torch.zeros(2, 4))  # eps avoids 0/0
    per_tensor = ternarize(torch.tensor([[4.0, 0.1], [-4.0, 0.0]]), dim=None)  # s = 2.025
    assert torch.allclose(per_tensor, torch.tensor([[2.025, 0.0], [-2.025, 0.0]]))


def test_fixed_point_rounds_and_saturates():
    x = torch.tensor([0.1, 0.125, 0.0625, 0.1875, -0.3, 100.0, -100.0, 15.9, 15.94], requires_grad=True)
    y = fixed_point(x, total_bits=8, frac_bits=3)  # step 1/8, codes [-128, 127]: [-16, 15.875]
    assert y.tolist() == [0.125, 0.125, 0.0, 0.25, -0.25, 15.875, -16.0, 15.875, 15.875]
    y.sum().backward()
    # 15.9 rounds to the top code (gradient 1); 15.94 rounds to code 128 and saturates
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    u = fixed_point(torch.tensor([-1.0, 0.3, 9.0]), total_bits=4, frac_bits=1, signed=False)
    assert u.tolist() == [0.0, 0.5, 7.5]
    assert fixed_point(torch.tensor([13.0, 1000.0]), 4, -2).tolist() == [12.0, 28.0]  # step 4


# --------------------------------------------------------------------------- errors and modules


@pytest.mark.parametrize("call,match", [
    (lambda x: quantize_int(x, 1), "bits=1"),
    (lambda x: quantize_int(x, 0, symmetric=False), "bits=0"),
    (lambda x: quantize_int(x, 17), "bits=17"),
    (lambda x: quantize_int(x, 4.0), "bits=4.0"),
    (lambda x: quantize_int(x, 4, granularity="group", group_size=5), "group_size=5 does not divide"),
    (lambda x: quantize_int(x, 4, granularity="group", group_size=0), "group_size=0"),
    (lambda x: quantize_int(x, 4, granularity="per_row"), "unknown granularity 'per_row'"),
    (lambda x: quantize_int(x, 4, clip_ratio=0.0), "clip_ratio=0.0"),
    (lambda x: quantize_int(x[0], 4, granularity="per_channel"), "per_channel"),
    (lambda x: quantize_int(x * math.nan, 4), "inf or nan"),
    (lambda x: fake_quant_int(x, torch.ones(1, 1), None, 4, symmetric=False), "zero=None"),
    (lambda x: fixed_point(x, 0, 2), "total_bits=0"),
    (lambda x: fixed_point(x, 8, 2.5), "frac_bits=2.5"),
    (lambda x: LsqQuantizer(bits=1), "bits=1"),
    (lambda x: LsqQuantizer(bits=4, channels=0), "channels=0"),
    (lambda x: IntFakeQuantizer(4, granularity="rows"), "unknown granularity 'rows'"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(randn(4, 12))


def test_int_fake_quantizer_module():
    module = IntFakeQuantizer(bits=8, granularity="per_token")
    x = randn(2, 3, 16)
    assert torch.equal(module(x), quantize_int(x, 8, granularity="per_token"))
    assert "per_token" in repr(module)
