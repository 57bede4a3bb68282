"""L4Q: LoRA through a learned (LSQ) grid. The gradients are LSQ's closed forms, training moves
the adapters and the grids (never W0), the merged model lies on the learned grid, its packed file
dequantizes to it, and a resume is exact."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.train.l4q import L4QTraining, LsqLoraLinear
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def l4q(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", bits=3, group_size=32, rank=4)
    params.update(overrides)
    config = L4QTraining.Params(**params)
    return config, L4QTraining(config)


def test_the_gradients_are_lsqs_closed_forms():
    torch.manual_seed(0)
    layer = LsqLoraLinear(torch.nn.Linear(8, 2, bias=False), rank=2, alpha=2.0, bits=3, group_size=4)
    with torch.no_grad():
        layer.lora_B.normal_()  # a nonzero update, so W' differs from W0
        layer.step.mul_(0.7)  # some codes saturate
    upstream = torch.randn(2, 8)
    layer.effective_weight().backward(upstream)

    with torch.no_grad():
        merged = (layer.weight + layer.scale * layer.lora_B @ layer.lora_A).reshape(2, 2, 4)
        step, offset = layer.grid()
        v = (merged - offset) / step
        inside = (torch.round(v) >= layer.qmin) & (torch.round(v) <= layer.qmax)
        g = upstream.reshape(2, 2, 4)
        step_grad = torch.where(inside, torch.round(v) - v, torch.round(v).clamp(layer.qmin, layer.qmax)) * g
        expected_step = step_grad.sum(-1) / math.sqrt(4 * layer.qmax)
        expected_offset = torch.where(inside, 0.0, g).sum(-1)
        expected_merged = torch.where(inside, g, 0.0).reshape(2, 8)
    assert 0 < (~inside).sum() < inside.numel()  # both cases are exercised
    assert torch.allclose(layer.step.grad, expected_step.reshape(-1), atol=1e-6)
    assert torch.allclose(layer.offset.grad, expected_offset.reshape(-1), atol=1e-6)
    assert torch.allclose(layer.lora_B.grad, layer.scale * expected_merged @ layer.lora_A.T, atol=1e-5)
    assert layer.weight.grad is None  # W0 is frozen


def test_l4q_trains_adapters_and_grids_and_merges_onto_the_learned_grid(tmp_path):
    from safetensors.torch import load_file

    from components.quant.base import dequantize_packed

    config, method = l4q()
    model, base = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    # a frozen random model learns through rank-4 adapters only: slower than full training
    assert sum(result.losses[-5:]) < 0.9 * sum(result.losses[:5])
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    for key, value in base.state_dict().items():  # only the block projections changed
        if "_proj" not in key:
            assert torch.equal(model.state_dict()[key], value), key
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            groups = module.weight.detach().reshape(module.out_features, -1, 32)
            assert max(g.unique().numel() for row in groups for g in row) <= 8, name  # 3 bits
    assert result.method_facts["quantized_layers"] == 14 and result.method_facts["weight_bits"] == 3

    quantized = method.pack(model)
    quantized.save_packed(tmp_path / "quantized.safetensors")
    packed, meta = load_file(tmp_path / "quantized.safetensors"), quantized.meta
    assert len(meta["quantized_tensors"]) == 14 and meta["bits_per_weight"] < 3 + 2 * 32 / 32 + 0.01
    for name in meta["quantized_tensors"]:
        weight = model.get_parameter(name).detach()
        restored = dequantize_packed(packed, name, tuple(weight.shape), 3)
        assert torch.equal(restored, quantized.state_dict[name]), name
        assert torch.allclose(restored, weight, rtol=1e-5, atol=1e-7), name


def test_an_l4q_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: l4q(steps=12, checkpoint_every=4))


def test_bad_params_are_refused_by_name():
    with pytest.raises(ValueError, match=r"params\.group_size=48 does not divide the input width of"):
        train(nano(), pattern_blocks(), *l4q(group_size=48), progress=False)
    with pytest.raises(ValidationError, match="l4q already trains only the adapters"):
        L4QTraining.Params(freeze=("embed",))
    with pytest.raises(ValueError, match=r"params\.rank=100 is larger than layer"):
        train(nano(), pattern_blocks(), *l4q(rank=100), progress=False)
