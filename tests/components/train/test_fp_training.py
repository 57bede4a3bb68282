"""Floating-point quantization training (Sun et al. 2025): only the chosen GEMM inputs are
quantized, each block of elements gets its own absmax scale in the paper's inf-free format, the
method trains, folds back to a plain Llama with its format in the facts, and bad settings are
refused by name."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.quant.minifloat import MinifloatFormat, minifloat_fake_quant
from components.train.fp_training import FloatingPointTraining
from components.train.halo import LowPrecisionLinear
from components.train.trainer import train
from tests.components.train.test_trainer import nano, pattern_blocks


def fp(**overrides):
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32", exp_bits=2, man_bits=1,
                  block_size=16)
    params.update(overrides)
    config = FloatingPointTraining.Params(**params)
    return config, FloatingPointTraining(config)


def grads_through(layer: torch.nn.Module, x: torch.Tensor, e: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(e)
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("operands", [("P2", "P4", "P6"), ("P1", "P2", "P3", "P4", "P5", "P6"), ("P1", "P5")])
def test_each_gemm_sees_exactly_the_operands_it_quantizes(operands):
    """y = Q1(x) Q2(W)^T, dX = Q3(e) Q4(W), dW = Q5(e)^T Q6(x), with Qi the identity for an operand
    not listed; the format is the paper's (no inf or NaN codes: e4m3 reaches 480, not OCP's 448)."""
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(8, 32, generator=g), torch.randn(8, 16, generator=g)
    fmt = MinifloatFormat(4, 3, nan_encoding="none")
    assert fmt.max_value == 480.0
    linear = torch.nn.Linear(32, 16, bias=False)
    layer = LowPrecisionLinear(linear, "layer", fmt, level=0, operands=operands, block_size=8)

    def q(t, which):
        return minifloat_fake_quant(t, fmt, 8) if which in operands else t

    w = linear.weight.detach()
    want = (q(x, "P1") @ q(w, "P2").T, q(e, "P3") @ q(w, "P4"), q(e, "P5").T @ q(x, "P6"))
    for got, expected in zip(grads_through(layer, x, e), want):
        assert torch.equal(got, expected), operands


def test_a_rotation_level_with_an_operand_subset_is_refused():
    """HALO's rotations are undone around GEMMs whose operands are all quantized; a subset has no meaning."""
    with pytest.raises(ValueError, match=r"layer: HALO level 2 .* got operands \['P2', 'P4'\]"):
        LowPrecisionLinear(torch.nn.Linear(32, 16), "layer", "int8", level=2, operands=("P2", "P4"))


def test_fp_training_trains_folds_back_and_records_its_format():
    config, method = fp()
    model, base = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert sum(result.losses[-3:]) < 0.8 * sum(result.losses[:3])
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert not any(isinstance(m, LowPrecisionLinear) for m in model.modules())
    assert result.method_facts == {"format": "e2m1", "format_exp_bits": 2, "format_man_bits": 1, "format_bits": 4,
                                   "format_block_size": 16, "quantized_operands": ["P2", "P4", "P6"],
                                   "low_precision_layers": 14}
    # the quantization is real: fewer bits end elsewhere than more bits from the same start
    wider = nano()
    train(wider, pattern_blocks(), *fp(exp_bits=5, man_bits=7, block_size=None), progress=False)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, wider.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("params, message", [
    (dict(exp_bits=2, man_bits=1, bits=8), r"exp_bits=2 \+ man_bits=1 \+ 1 sign bit = 4 bits, which does not fit bits=8"),
    (dict(exp_bits=0, man_bits=3), "exp_bits\n  Input should be greater than or equal to 1"),
    (dict(exp_bits=4, man_bits=3, operands=["P2", "P2"]), r"operands lists an operand twice: \['P2', 'P2'\]"),
    (dict(exp_bits=4, man_bits=3, operands=["P7"]), "operands.0\n  Input should be 'P1'"),
])
def test_bad_params_are_refused_by_name(params, message):
    with pytest.raises(ValidationError, match=message):
        FloatingPointTraining.Params(**params)


def test_a_block_that_does_not_divide_a_layer_names_it():
    _, method = fp(block_size=128)
    with pytest.raises(ValueError, match=r"params.block_size=128 does not divide the input width of "
                                         r"model\.layers\.0\.mlp\.down_proj \(192\), the last dimension of its weight \(P2\)"):
        method.prepare(nano())


def test_a_non_finite_operand_names_its_layer_and_operand():
    _, method = fp(operands=["P1", "P2"])
    model = nano()
    method.prepare(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    batch = torch.from_numpy(pattern_blocks()[:2].astype("int64"))
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.self_attn\.o_proj: the weight of a e2m1 "
                                                 r"\(blocks of 16\) GEMM is not finite"):
        model(input_ids=batch)
