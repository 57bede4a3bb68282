"""Double Rounding: one model trained jointly at several widths. The forward at a lower width is the
second rounding of the stored codes, the step's gradients are LSQ's with ALRS's per-width factor,
joint training runs every width, the packed file holds the stored codes, ``bit_switch`` rebuilds
each trained width from them exactly, and a resume is exact."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.quant.base import QuantizationError, dequantize_packed
from components.quant.bit_switch import BitSwitch, double_round
from components.train.double_rounding import DoubleRounding, DoubleRoundingLinear, dequantized, initial_step
from components.train.replacement import LinearReplacement
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def double_rounding(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", bit_widths=(8, 4, 2))
    params.update(overrides)
    config = DoubleRounding.Params(**params)
    return config, DoubleRounding(config)


def layer(alrs: bool = True, seed: int = 0) -> DoubleRoundingLinear:
    torch.manual_seed(seed)
    weights = DoubleRounding(DoubleRounding.Params(bit_widths=(8, 4, 2), alrs=alrs)).step_grad_weights()
    return DoubleRoundingLinear(torch.nn.Linear(16, 4, bias=False), 8, weights)


def test_params_sort_widths_and_refuse_repeats_and_out_of_range():
    assert DoubleRounding.Params(bit_widths=[4, 8, 2]).bit_widths == (8, 4, 2)
    with pytest.raises(ValidationError, match=r"bit_widths \[4, 4\] repeats a width"):
        DoubleRounding.Params(bit_widths=[4, 4])
    with pytest.raises(ValidationError, match="every width must be 2..8 bits"):
        DoubleRounding.Params(bit_widths=[16, 4])
    assert DoubleRounding(DoubleRounding.Params(bit_widths=(8, 6, 4, 2))).step_grad_weights() == \
        {8: 1.0, 6: 0.25, 4: 1 / 16, 2: 1 / 64}
    assert set(DoubleRounding(DoubleRounding.Params(alrs=False)).step_grad_weights().values()) == {1.0}


def test_a_lower_width_is_the_second_rounding_of_the_stored_codes():
    module = layer()
    with torch.no_grad():
        module.step.mul_(0.6)  # some stored codes saturate
        stored_codes = torch.clamp(torch.round(module.weight / module.step.unsqueeze(1)), -127, 127)
        assert (stored_codes.abs() == 127).any()
        for bits in (8, 4, 2):
            module.bits = bits
            expected = double_round(stored_codes, 8, bits) * (2 ** (8 - bits) * module.step.unsqueeze(1))
            assert torch.equal(module.effective_weight(), expected)
            assert len(torch.unique(double_round(stored_codes, 8, bits))) <= 2 ** bits - 1
    # 2 bits are {-1, 0, 1} codes of a step 64x the stored one; halves round to even
    assert double_round(torch.tensor([-127., -96., -32., 31., 32., 95., 96.]), 8, 2).tolist() == \
        [-1, -1, -0., 0, 0, 1, 1]


def test_initial_step_minimizes_the_error_summed_over_the_widths():
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    minmax = weight.abs().amax(1) / 127

    def error(step, widths):
        return sum(((dequantized(weight, step, 8, b) - weight) ** 2).sum(1) for b in widths)

    for widths in ((8, 4, 2), (8,)):
        step = initial_step(weight, 8, widths)
        assert (error(step, widths) <= error(minmax, widths)).all()
        assert (error(step, widths) <= error(minmax * 0.5, widths)).all()
    # alone, 2 bits ({-1, 0, 1}) want a step well inside the range: min-max would zero most weights
    assert (initial_step(weight, 2, (2,)) < 0.8 * weight.abs().amax(1)).all()


def test_step_gradients_are_lsqs_and_alrs_scales_only_the_lower_widths_step_gradient():
    upstream = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for alrs in (True, False):
        for bits in (8, 2):
            module = layer(alrs)
            with torch.no_grad():
                module.step.mul_(0.6)
            module.bits = bits
            module.effective_weight().backward(upstream)
            grads[alrs, bits] = module.step.grad.clone(), module.weight.grad.clone()
    # at the stored width: LSQ's closed form (round(v) - v inside the grid, the bound outside)
    module = layer()
    with torch.no_grad():
        step = module.step * 0.6
        v = module.weight / step.unsqueeze(1)
        inside = v.round().abs() <= 127
        expected = (torch.where(inside, v.round() - v, v.round().clamp(-127, 127)) * upstream).sum(1)
    assert 0 < (~inside).sum() < inside.numel()
    assert torch.allclose(grads[True, 8][0], expected / math.sqrt(16 * 127), atol=1e-6)
    assert torch.equal(grads[True, 8][0], grads[False, 8][0])
    assert torch.allclose(grads[True, 2][0], grads[False, 2][0] / 64, rtol=1e-6)  # ALRS: 2^-(8-2)
    assert torch.equal(grads[True, 2][1], grads[False, 2][1])  # the weights' gradient is untouched


def test_joint_training_runs_every_width_and_packs_the_stored_codes(monkeypatch):
    config, method = double_rounding()
    widths_seen = []
    set_width = DoubleRounding.set_width
    monkeypatch.setattr(DoubleRounding, "set_width", lambda self, m, b: (widths_seen.append(b), set_width(self, m, b)))
    model, base = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert widths_seen[:3] == [2, 4, 8] and len(widths_seen) == 3 * 30 + 1  # + the stored width at finalize
    assert sum(result.losses[-5:]) < 0.7 * sum(result.losses[:5])
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert result.method_facts == {"bit_widths": [8, 4, 2], "stored_bits": 8, "alrs": True, "quantized_layers": 14}
    prepared = nano()
    method.prepare(prepared)  # one forward and backward per width
    assert method.flops_per_token(prepared, 32) == 3 * LinearReplacement.flops_per_token(method, prepared, 32)

    quantized = method.pack(model)
    assert quantized.meta["scheme"] == "double_rounding" and quantized.meta["bits"] == 8
    for name, weight in quantized.state_dict.items():
        restored = dequantize_packed(quantized.packed, name, tuple(weight.shape), 8, zero_point=128)
        assert torch.equal(restored, weight)
        assert torch.equal(weight, model.get_parameter(name).detach())  # training ended on the grid
    # every trained width comes back from the packed file alone
    switch = BitSwitch(BitSwitch.Params(bits=2))
    switch.use_input_codes(quantized.packed, quantized.meta, "packed")
    switched = switch.quantize(model)
    name = "model.layers.0.mlp.down_proj.weight"
    step = method.steps["model.layers.0.mlp.down_proj"]
    codes = torch.round(model.get_parameter(name).detach() / step.unsqueeze(1))
    assert torch.equal(switched.state_dict[name], double_round(codes, 8, 2) * (64 * step.unsqueeze(1)))
    assert switched.meta["bits"] == 2 and switched.meta["source_bits"] == 8 and switched.meta["trained_width"]
    restored = dequantize_packed(switched.packed, name, tuple(codes.shape), 2, zero_point=2)
    assert torch.equal(restored, switched.state_dict[name])


def test_bit_switch_refuses_other_codes_a_higher_width_and_changed_weights():
    config, method = double_rounding(steps=4, bit_widths=(6, 4))
    model = nano()
    train(model, pattern_blocks(), config, method, progress=False)
    quantized = method.pack(model)
    with pytest.raises(QuantizationError, match=r"input x.safetensors holds 'qat' codes"):
        BitSwitch(BitSwitch.Params(bits=4)).use_input_codes(quantized.packed, {"scheme": "qat", "bits": 2},
                                                             "x.safetensors")
    with pytest.raises(QuantizationError, match="params.bits=8 is above the 6 bits input x.safetensors stores"):
        BitSwitch(BitSwitch.Params(bits=8)).use_input_codes(quantized.packed, quantized.meta, "x.safetensors")
    switch = BitSwitch(BitSwitch.Params(bits=4))
    switch.use_input_codes(quantized.packed, quantized.meta, "x.safetensors")
    with torch.no_grad():
        model.get_parameter("model.layers.1.self_attn.q_proj.weight").add_(1e-3)
    with pytest.raises(QuantizationError, match="model.layers.1.self_attn.q_proj.weight is not what its packed codes"):
        switch.quantize(model)


def test_resume_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: double_rounding(steps=12, checkpoint_every=4))
