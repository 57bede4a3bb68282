"""SR-STE: the forward computes with the current N:M mask, the backward reaches every weight plus
the sparse-refined decay, masks adapt while training, and the folded model is exactly N:M."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.prune.base import PruneError, PruneParams
from components.train.sr_ste import AdaptiveNMLinear, SrSteTraining
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def sr_ste(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", decay=1e-2)
    params.update(overrides)
    config = SrSteTraining.Params(**params)
    return config, SrSteTraining(config)


def test_forward_uses_the_2_4_mask_and_backward_adds_the_decay_on_pruned_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3, bias=False)
    layer = AdaptiveNMLinear(linear, PruneParams(pattern="2:4"), decay=0.5)
    weight = layer.effective_weight()
    keep = layer.mask().bool()
    assert torch.equal(weight, linear.weight * keep)
    assert (keep.reshape(3, 2, 4).sum(-1) == 2).all()  # two of every four inputs
    kept_min = linear.weight.abs().masked_fill(~keep, float("inf")).reshape(3, 2, 4).amin(-1)
    dropped_max = linear.weight.abs().masked_fill(keep, 0).reshape(3, 2, 4).amax(-1)
    assert (kept_min >= dropped_max).all()  # the largest |w| of each group stay
    upstream = torch.randn(3, 8)
    weight.backward(upstream)
    expected = upstream + 0.5 * (~keep) * linear.weight.detach()
    assert torch.allclose(linear.weight.grad, expected)


def test_masks_adapt_while_training_and_the_folded_model_is_exactly_2_4():
    config, method = sr_ste()
    model = nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    assert result.method_facts["mask_changes"] > 0  # weights moved in and out of the mask
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            nonzero = (module.weight != 0).reshape(module.out_features, -1, 4).sum(-1)
            assert (nonzero <= 2).all(), name


def test_an_sr_ste_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: sr_ste(steps=12, checkpoint_every=4))


def test_patterns_that_cannot_apply_are_refused():
    with pytest.raises(ValidationError, match="SR-STE trains an N:M pattern"):
        SrSteTraining.Params(pattern="unstructured")
    with pytest.raises(PruneError, match=r"model\.layers\.0\.mlp\.down_proj: pattern 3:7 needs the input width 192 to be a "
                                         r"multiple of 7"):
        train(nano(), pattern_blocks(), *sr_ste(pattern="3:7"), progress=False)
