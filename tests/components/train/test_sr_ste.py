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


def test_slorb_adds_a_group_sum_low_rank_term_started_from_the_pruned_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3, bias=False)
    layer = AdaptiveNMLinear(linear, PruneParams(pattern="2:4"), decay=0.0, slorb_group=4)
    pruned = linear.weight.detach() * (1 - layer.mask())
    assert torch.allclose(layer.slorb, pruned.reshape(3, 2, 4).mean(-1))  # AST's "mean" start
    x = torch.randn(5, 8)
    group_sums = x.reshape(5, 2, 4).sum(-1)  # P x: each group of 4 inputs summed
    expected = x @ (linear.weight * layer.mask()).T + group_sums @ layer.slorb.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "slorb"]  # the projection is fixed
    summed = AdaptiveNMLinear(linear, PruneParams(pattern="2:4"), 0.0, slorb_group=2, slorb_init="sum",
                              trainable_projection=True)
    assert torch.allclose(summed.slorb, pruned.reshape(3, 4, 2).sum(-1))
    assert [n for n, _ in summed.named_parameters()] == ["weight", "slorb", "projection"]


def test_slorb_trains_and_folds_into_the_same_function():
    config, method = sr_ste(slorb_group=16, slorb_trainable_projection=True)
    model = nano()
    blocks = pattern_blocks()
    result = train(model, blocks, config, method, progress=False)
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    facts = result.method_facts
    assert facts["sr_ste_sparsity_before_fold"] == pytest.approx(0.5, abs=0.01)  # the N:M part, measured
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    # a 16-group term per Linear: out x in/16 for S plus in/16 x in for the trained projection
    assert facts["slorb_params"] == sum(m.out_features * m.in_features // 16 + m.in_features ** 2 // 16
                                        for m in linears)
    dense_share = sum(int((m.weight != 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert dense_share > 0.9  # folded: S @ P fills the pruned places, so the saved weights are dense


def test_the_slorb_fold_keeps_the_function():
    _, method = sr_ste(slorb_group=8)
    model = nano().eval()
    batch = torch.as_tensor(pattern_blocks(4, seed=1), dtype=torch.long)
    with torch.no_grad():
        dense = model(input_ids=batch).logits
        method.prepare(model)
        assert sum(isinstance(m, AdaptiveNMLinear) for m in model.modules()) == 7 * len(model.model.layers)
        before = model(input_ids=batch).logits
        method.finalize(model)
        after = model(input_ids=batch).logits
    assert not any(isinstance(m, AdaptiveNMLinear) for m in model.modules())
    assert not torch.allclose(dense, before, atol=1e-3)  # the 2:4 + SLoRB model is another function...
    assert torch.allclose(before, after, atol=1e-5)  # ...which the plain folded Linears compute exactly


def test_an_slorb_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: sr_ste(steps=12, checkpoint_every=4, slorb_group=16,
                                                    slorb_trainable_projection=True))


def test_slorb_settings_that_cannot_apply_are_refused():
    with pytest.raises(ValidationError, match="set slorb_group too"):
        SrSteTraining.Params(slorb_init="sum")
    with pytest.raises(ValueError, match=r"params\.slorb_group=5 does not divide the input width of "
                                         r"model\.layers\.0\.mlp\.down_proj \(192\)"):
        train(nano(), pattern_blocks(), *sr_ste(slorb_group=5), progress=False)
