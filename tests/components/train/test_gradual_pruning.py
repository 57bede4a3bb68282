"""Gradual magnitude pruning: the cubic schedule, masks that tighten during training and keep the
largest weights, FLOPs at the average density, an exact resume across a mask update, bad windows."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from components.train.gradual_pruning import GradualPruning
from components.train.method import block_linears, block_weight_counts
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, dense, nano, pattern_blocks


def gradual(**overrides):
    params = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", final_sparsity=0.5,
                  start_fraction=0.25, end_fraction=0.75, prune_every=2)
    params.update(overrides)
    config = GradualPruning.Params(**params)
    return config, GradualPruning(config)


def test_the_schedule_is_zhu_and_guptas_cubic_ramp_inside_the_window():
    _, method = gradual(steps=100, final_sparsity=0.8, prune_every=10)
    assert method.window() == (25, 75)
    ramp = {t: method.sparsity_at(t) for t in range(1, 101) if method.sparsity_at(t) is not None}
    assert sorted(ramp) == [25, 35, 45, 55, 65, 75]
    for t, s in ramp.items():
        assert s == pytest.approx(0.8 * (1 - (1 - (t - 25) / 50) ** 3))
    assert ramp[25] == 0.0 and ramp[75] == pytest.approx(0.8)
    # density 1 through step 25's forward, then each update's density until the next one
    expected = (25 + sum(10 * (1 - ramp[t]) for t in (25, 35, 45, 55, 65)) + 25 * (1 - ramp[75])) / 100
    assert method.mean_density() == pytest.approx(expected)
    _, one_shot = gradual(steps=100, final_sparsity=0.8, start_fraction=1.0, end_fraction=1.0)
    assert [t for t in range(1, 101) if one_shot.sparsity_at(t) is not None] == [100]
    assert one_shot.mean_density() == 1.0


def test_masks_tighten_during_training_and_keep_the_largest_weights():
    seen = {}

    class Watch(GradualPruning):  # each layer's sparsity after every step, and the weights at the last update
        def after_step(self, model):
            before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
            super().after_step(model)
            seen[self._step] = {n: float((~mask).float().mean()) for n, mask in self.masks.items()}
            if self.sparsity_at(self._step) is not None:
                seen["weights"] = before

    config, _ = gradual()
    model = nano()
    result = train(model, pattern_blocks(), config, Watch(config), progress=False)
    t0, t1 = 3, 9  # round(0.25 * 12), round(0.75 * 12)
    assert all(v == 0.0 for t in range(1, t0) for v in seen[t].values())
    per_step = [max(seen[t].values()) for t in range(1, 13)]
    assert per_step == sorted(per_step) and per_step[-1] == pytest.approx(0.5, abs=1e-3)
    assert seen[t1] == seen[12]  # the final sparsity is kept after the window
    linears = block_linears(model)
    for name, weights in seen["weights"].items():  # the last update kept the largest |w| of that moment
        live = linears[name].weight != 0
        assert weights[live].abs().min() >= weights[~live].abs().max()
    assert result.method_facts["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result.method_facts["mean_density"] == pytest.approx(Watch(config).mean_density())
    # the Journey law's N: every block weight, the nonzero ones left, and their average over training
    counts = block_weight_counts(model, result.method_facts["mean_density"])
    total = sum(m.weight.numel() for m in linears.values())
    assert counts["block_params"] == total
    assert counts["block_params_final"] == sum(int((m.weight != 0).sum()) for m in linears.values())
    assert counts["block_params_final"] == pytest.approx(0.5 * total, rel=1e-3)
    assert counts["block_params_avg"] == round(total * result.method_facts["mean_density"])
    assert counts["block_params_final"] < counts["block_params_avg"] < total
    assert block_weight_counts(nano())["block_params_avg"] == total  # no mask: the dense count throughout
    dense_flops = train(nano(), pattern_blocks(), *dense(steps=12), progress=False).train_flops
    assert dense_flops > result.train_flops > 0.5 * dense_flops


def test_a_resume_across_a_mask_update_is_bit_exact(tmp_path):
    # masks change after steps 3, 5, 7 and 9: the resume at step 8 restores them and prunes at 9
    assert_resume_is_exact(tmp_path, lambda: gradual(checkpoint_every=4))


def test_windows_that_cannot_be_are_refused():
    with pytest.raises(ValidationError, match="start_fraction=0.8 is after end_fraction=0.5"):
        GradualPruning.Params(start_fraction=0.8, end_fraction=0.5)
    with pytest.raises(ValidationError, match="pruning never regrows weights"):
        GradualPruning.Params(initial_sparsity=0.6, final_sparsity=0.5)
    with pytest.raises(ValidationError, match="final_sparsity"):
        GradualPruning.Params(final_sparsity=1.0)
