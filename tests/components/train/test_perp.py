"""PERP: a pruned model retrains through MaskLoRA and its norms only, and the merged weights keep
exactly its zeros."""
from __future__ import annotations

import pytest
import torch

from components.train.perp import MaskedLoraLinear, PerpRetrain
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def pruned_nano():
    """nano with the smaller half of every block weight (by magnitude) set to zero."""
    model = nano()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.masked_fill_(w.abs() <= w.abs().flatten().median(), 0.0)
    return model


def perp(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", rank=4, alpha=8.0)
    params.update(overrides)
    config = PerpRetrain.Params(**params)
    return config, PerpRetrain(config)


def test_the_update_is_masked_so_the_merged_weight_keeps_the_zeros():
    linear = torch.nn.Linear(12, 8, bias=False)
    with torch.no_grad():
        linear.weight[:, ::2] = 0.0
    layer = MaskedLoraLinear(linear, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    weight = layer.effective_weight()
    assert torch.equal(weight == 0, linear.weight == 0) and not torch.equal(weight, linear.weight)
    assert torch.equal(layer.folded().weight, weight.detach())


def test_only_adapters_and_norms_train_and_sparsity_is_unchanged():
    config, method = perp()
    model, before = pruned_nano(), pruned_nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    zeros_before = {n: p == 0 for n, p in before.named_parameters() if p.ndim == 2 and ".layers." in n}
    for name, zeros in zeros_before.items():
        assert torch.equal(model.get_parameter(name) == 0, zeros), name
    params_before = dict(before.named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params_before[n])}
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    assert any("norm" in n for n in changed) and any(".q_proj." in n for n in changed)
    linears = [m for m in before.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    norms = sum(p.numel() for n, p in before.named_parameters() if "norm" in n)
    assert result.trainable_params == sum(4 * (m.in_features + m.out_features) for m in linears) + norms
    assert type(model) is type(before) and model.state_dict().keys() == before.state_dict().keys()


def test_a_perp_resume_is_bit_exact(tmp_path, monkeypatch):
    import tests.components.train.test_trainer as helpers

    monkeypatch.setattr(helpers, "nano", pruned_nano)  # the helper builds its models with nano()
    assert_resume_is_exact(tmp_path, lambda: perp(steps=12, checkpoint_every=4))


def test_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="no targeted layer has a zero weight; prune it first"):
        train(nano(), pattern_blocks(), *perp(), progress=False)
