"""Dynamic fixed point (Das et al. 2018): the shared exponent puts each operand's absmax on the top
magnitude bit, stochastic rounding is unbiased, the three GEMMs run on the quantized operands, the
static control freezes each operand's first exponent, a non-finite operand names its layer, and a
resume is exact."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.quant.fake_quant import fixed_point, shared_exponent_frac_bits
from components.train.dynamic_fixed_point import DynamicFixedPointLinear, DynamicFixedPointTraining
from components.train.halo import OPERANDS
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def dfp(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", bits=8)
    params.update(overrides)
    config = DynamicFixedPointTraining.Params(**params)
    return config, DynamicFixedPointTraining(config)


def test_params_refuse_bits_the_grid_cannot_hold_and_repeated_operands():
    with pytest.raises(ValidationError, match="bits"):
        DynamicFixedPointTraining.Params(bits=17)
    with pytest.raises(ValidationError, match="operands lists an operand twice"):
        DynamicFixedPointTraining.Params(operands=("P1", "P1"))
    with pytest.raises(ValidationError, match="exponent"):
        DynamicFixedPointTraining.Params(exponent="sometimes")
    assert DynamicFixedPointTraining.Params(operands=("P6", "P2")).operands == ("P2", "P6")


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_the_shared_exponent_puts_the_absmax_on_the_top_magnitude_bit(bits):
    generator = torch.Generator().manual_seed(bits)
    for scale in (1e-4, 0.03, 1.0, 700.0):
        x = torch.randn(32, 48, generator=generator) * scale
        f = shared_exponent_frac_bits(x, bits)
        top = float(x.abs().max()) * 2.0**f
        assert 2 ** (bits - 2) <= top < 2 ** (bits - 1)  # the top magnitude bit is set, the sign bit is free
        assert shared_exponent_frac_bits(x * 2, bits) == f - 1  # one exponent for the whole tensor, following it
        q = fixed_point(x, bits, f)
        assert float((q - x).abs().max()) <= 2.0 ** -f  # half a step, or one step where the top rounds up and saturates
    assert shared_exponent_frac_bits(torch.zeros(3), 8) == 0
    with pytest.raises(ValueError, match="absmax is inf"):
        shared_exponent_frac_bits(torch.tensor([1.0, float("inf")]), 8)


def test_stochastic_rounding_is_unbiased_and_stays_on_the_two_neighbours():
    torch.manual_seed(0)
    x = torch.tensor([0.1, -0.37, 1.3, 2.9])  # off-grid for steps of 1/4
    draws = torch.stack([fixed_point(x, 8, 2, stochastic=True) for _ in range(20000)])
    lower, upper = torch.floor(x * 4) / 4, torch.ceil(x * 4) / 4
    assert bool(((draws == lower) | (draws == upper)).all())
    assert torch.allclose(draws.mean(0), x, atol=0.01)  # nearest rounding's bias here is up to 0.12
    assert not torch.allclose(fixed_point(x, 8, 2), x, atol=0.01)
    saturated = fixed_point(torch.tensor([100.0], requires_grad=True), 8, 2, stochastic=True)
    assert float(saturated.detach()) == 127 / 4


def test_the_three_gemms_run_on_dynamic_fixed_point_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    layer = DynamicFixedPointLinear(linear, "layer", 6, OPERANDS, static=False, stochastic=False)
    x = torch.randn(5, 16, requires_grad=True)
    upstream = torch.randn(5, 8)
    layer(x).backward(upstream)

    def q(t):
        return fixed_point(t.detach(), 6, shared_exponent_frac_bits(t, 6))

    assert torch.allclose(layer(x), q(x) @ q(linear.weight).T, atol=1e-6)
    assert torch.allclose(x.grad, q(upstream) @ q(linear.weight), atol=1e-6)
    assert torch.allclose(linear.weight.grad, q(upstream).T @ q(x), atol=1e-6)
    assert not torch.allclose(x.grad, upstream @ linear.weight.detach(), atol=1e-3)  # 6 bits is visibly coarse


def test_static_exponents_freeze_at_their_first_use_and_then_saturate():
    torch.manual_seed(0)
    static = DynamicFixedPointLinear(torch.nn.Linear(16, 8, bias=False), "layer", 8, OPERANDS, static=True,
                                     stochastic=False)
    x = torch.randn(4, 16)
    static(x.requires_grad_()).sum().backward()
    first = static.frac_bits.clone()
    assert first[OPERANDS.index("P1")] == shared_exponent_frac_bits(x, 8)
    big = x.detach() * 16  # the dynamic exponent would drop by 4
    with torch.no_grad():
        y = static(big)
    assert torch.equal(static.frac_bits, first)
    top = 127 * 2.0 ** -int(first[OPERANDS.index("P1")])
    assert float(big.abs().max()) > top  # so the frozen grid clips the input
    weight = fixed_point(static.weight.detach(), 8, int(first[OPERANDS.index("P2")]))
    assert torch.allclose(y, fixed_point(big, 8, int(first[OPERANDS.index("P1")])) @ weight.T, atol=1e-5)


def test_a_non_finite_operand_names_its_layer():
    layer = DynamicFixedPointLinear(torch.nn.Linear(4, 4), "model.layers.0.mlp.up_proj", 8, OPERANDS,
                                    static=False, stochastic=False)
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.mlp\.up_proj: the input of a dynamic fixed "
                                                 r"point 8-bit GEMM is not finite \(absmax is inf\)"):
        layer(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))


def test_training_on_8_bit_operands_learns_and_saves_the_plain_model():
    for exponent in ("dynamic", "static"):
        config, method = dfp(exponent=exponent)
        model = nano()
        result = train(model, pattern_blocks(), config, method, progress=False)
        assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
        facts = result.method_facts
        assert facts["low_precision_layers"] == 14 and facts["bits_per_operand"] == 8
        assert type(model) is type(nano()) and not any("frac_bits" in k for k in model.state_dict())
        if exponent == "static":  # every layer froze its operands' exponents
            assert len(facts["static_frac_bits"]) == 14
            # the backward reuses the forward's quantized x and W (P6, P4), and P5 is P3 quantized once
            assert all(set(points) == {"P1", "P2", "P3"} for points in facts["static_frac_bits"].values())
        else:
            assert facts["static_frac_bits"] == {}


@pytest.mark.parametrize("exponent,rounding", [("static", "stochastic"), ("dynamic", "nearest")])
def test_resume_is_exact(tmp_path, exponent, rounding):
    assert_resume_is_exact(tmp_path, lambda: dfp(steps=12, checkpoint_every=4, exponent=exponent, rounding=rounding))
