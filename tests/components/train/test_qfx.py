"""QFX: fixed-point QAT with a learned binary point. The forward is the project's fixed-point grid,
the binary point starts where the weight's squared error is least, its gradient is LSQ's step
gradient through ``2^-round(f)``, it trains at its own rate (and not at all in the static
control), the packed file holds exactly the trained weights, and a resume is exact."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.quant.base import dequantize_packed
from components.quant.fake_quant import fixed_point
from components.train.qfx import FixedPointLinear, FixedPointTraining, mse_binary_point, on_fixed_point_grid
from components.train import trainer as trainer_module
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def qfx(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", bits=4)
    params.update(overrides)
    config = FixedPointTraining.Params(**params)
    return config, FixedPointTraining(config)


def test_params_refuse_bad_bits_and_a_learned_point_without_adamw():
    with pytest.raises(ValidationError, match="bits"):
        FixedPointTraining.Params(bits=9)
    with pytest.raises(ValidationError, match="optimizer='sgd' is not supported with it"):
        FixedPointTraining.Params(optimizer="sgd")
    assert FixedPointTraining.Params(optimizer="sgd", learn_binary_point=False).optimizer == "sgd"


def test_the_grid_is_the_projects_fixed_point_grid_and_the_start_is_mse_optimal():
    weights = [torch.randn(8, 32, generator=torch.Generator().manual_seed(s)) * scale
               for s, scale in ((0, 0.02), (1, 0.3))]
    for w in weights:
        for f in (-1, 3, 9):
            assert torch.equal(on_fixed_point_grid(w, torch.tensor(float(f)), 4), fixed_point(w, 4, f))

    def error(ws, f):
        return sum(float(((fixed_point(w, 4, f) - w) ** 2).sum()) for w in ws)

    for ws in ([weights[0]], [weights[1]], weights):
        best = mse_binary_point(ws, 4)
        assert error(ws, best) == min(error(ws, f) for f in range(-10, 31))  # the window holds the optimum
    # each tensor's own point beats the shared one on that tensor, and the two tensors want different points
    shared = mse_binary_point(weights, 4)
    own = [mse_binary_point([w], 4) for w in weights]
    assert own[0] != own[1] and all(error([w], f) <= error([w], shared) for w, f in zip(weights, own))
    assert mse_binary_point([torch.zeros(3, 4)], 4) == 0


def test_the_binary_points_gradient_is_lsqs_step_gradient_through_a_power_of_two():
    torch.manual_seed(0)
    module = FixedPointLinear(torch.nn.Linear(16, 4, bias=False), bits=4, frac_bits=2, learn=True)
    with torch.no_grad():
        module.frac_bits.fill_(5.2)  # rounds to 5: a step of 1/32, so weights above 7/32 saturate at 4 bits
    upstream = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    module.effective_weight().backward(upstream)
    step = 2.0 ** -5
    with torch.no_grad():
        v = module.weight / step
        codes = v.round().clamp(-8, 7)
        inside = v.round() == codes
        expected = float((torch.where(inside, v.round() - v, codes) * upstream).sum()) * (-math.log(2) * step)
    assert 0 < (~inside).sum() < inside.numel()
    assert math.isclose(float(module.frac_bits.grad), expected, rel_tol=1e-3)  # fp32 sums of mixed signs
    assert torch.equal(module.weight.grad, torch.where(inside, upstream, torch.zeros(())))  # clipped STE
    static = FixedPointLinear(torch.nn.Linear(16, 4, bias=False), bits=4, frac_bits=3, learn=False)
    assert "frac_bits" not in dict(static.named_parameters()) and "frac_bits" in static.state_dict()


def test_learned_points_train_at_their_own_rate_and_static_ones_stay(monkeypatch):
    points_moved = {}
    build = trainer_module._make_optimizer
    for learn in (True, False):
        config, method = qfx(learn_binary_point=learn, binary_point_lr=0.5)
        model = nano()
        optimizers = []
        monkeypatch.setattr(trainer_module, "_make_optimizer",
                            lambda m, c, meth: optimizers.append(build(m, c, meth)) or optimizers[-1])
        result = train(model, pattern_blocks(), config, method, progress=False)
        assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])
        facts = result.method_facts
        assert facts["quantized_layers"] == 14 and facts["bits_per_weight"] == 4.0
        points_moved[learn] = facts["binary_points_moved"]
        [opt] = optimizers  # the trainer's AdamW, with the method's group
        point_groups = [g for g in opt.param_groups if g["initial_lr"] == 0.5]
        if learn:  # the points are one group at binary_point_lr, apart from the weights, in no other group
            assert len(point_groups) == 1 and len(point_groups[0]["params"]) == 14
            assert point_groups[0]["weight_decay"] == 0.0
            assert all(p.numel() == 1 for p in point_groups[0]["params"])
            in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
            assert len(in_groups) == len(set(in_groups))
        else:
            assert point_groups == [] and facts["binary_point_drift_max"] == 0.0  # the points are buffers
    assert points_moved[True] > 0 and points_moved[False] == 0


def test_global_start_shares_one_point_and_pack_round_trips_exactly():
    config, method = qfx(steps=6, binary_point="global", learn_binary_point=False)
    model = nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert len(set(method.initial_points.values())) == 1
    assert set(result.method_facts["frac_bits"].values()) == set(method.initial_points.values())
    assert type(model) is type(nano())  # folded back to the plain model
    quantized = method.pack(model)
    assert quantized.meta["scheme"] == "fixed_point" and quantized.meta["bits"] == 4
    for name, weight in quantized.state_dict.items():
        assert torch.equal(weight, model.get_parameter(name).detach())  # training ended on the grid
        restored = dequantize_packed(quantized.packed, name, tuple(weight.shape), 4, zero_point=8)
        assert torch.equal(restored, weight)
    f = result.method_facts["frac_bits"]["model.layers.0.mlp.up_proj"]
    codes = model.get_parameter("model.layers.0.mlp.up_proj.weight").detach() * 2.0 ** f
    assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7


def test_resume_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: qfx(steps=12, checkpoint_every=4, binary_point_lr=0.5))
