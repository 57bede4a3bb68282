"""The trainer's extension points: LR schedules, optimizers, freezing by pattern, a method's own
optimizer; and the facts they leave (trainable parameters, optimizer-state bytes, measured)."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.train.dense import DenseTraining
from components.train.trainer import StageSchedule, lr_factor, train
from tests.components.train.test_trainer import assert_resume_is_exact, dense, nano, pattern_blocks, states_equal


def factors(**params) -> list[float]:
    config = DenseTraining.Params(steps=11, warmup_steps=1, min_lr_ratio=0.0, **params)
    return [lr_factor(step, config) for step in range(11)]


def test_each_schedule_has_its_shape_after_the_same_warmup():
    cosine, linear, constant = factors(schedule="cosine"), factors(schedule="linear"), factors(schedule="constant")
    assert cosine[0] == linear[0] == constant[0] == 1.0  # one warmup step reaches the peak
    assert linear[1:] == pytest.approx([1 - i / 9 for i in range(10)])  # straight to min_lr at the last step
    assert cosine[1:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(10)])
    assert constant == [1.0] * 11
    wsd = factors(schedule="wsd", decay_fraction=1 / 3)
    assert wsd[:8] == [1.0] * 8  # warmup, then stable while progress (step - 1) / 9 <= 2/3
    assert wsd[8:] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert factors(schedule="wsd", decay_fraction=1.0) == pytest.approx(linear)  # all decay: linear


def test_the_infinite_schedule_cools_down_holds_and_anneals():
    config = DenseTraining.Params(steps=12, warmup_steps=2, schedule="infinite", cooldown_steps=4,
                                  constant_lr_ratio=0.25, anneal_steps=3, min_lr_ratio=0.01)
    f = [lr_factor(step, config) for step in range(12)]
    assert f[:2] == [0.5, 1.0]  # warmup
    assert f[2:6] == pytest.approx([0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in (1, 2, 3, 4)])
    assert f[5:9] == [0.25] * 4  # cooled down, then constant
    assert f[9:] == pytest.approx([0.25 * (0.01 / 0.25) ** (i / 3) for i in (1, 2, 3)])  # exponential anneal
    assert f[11] == pytest.approx(0.01)
    held = DenseTraining.Params(steps=5, warmup_steps=0, schedule="infinite", constant_lr_ratio=0.5, cooldown_steps=2)
    assert [lr_factor(s, held) for s in range(5)][-3:] == [0.5] * 3  # no anneal: ends at the constant lr
    with pytest.raises(ValidationError, match="warmup_steps \\+ cooldown_steps \\+ anneal_steps = 13 is more than"):
        DenseTraining.Params(steps=12, warmup_steps=2, schedule="infinite", cooldown_steps=8, anneal_steps=3)
    with pytest.raises(ValidationError, match="min_lr_ratio=0.5 is above constant_lr_ratio=0.25"):
        DenseTraining.Params(steps=12, schedule="infinite", constant_lr_ratio=0.25, anneal_steps=3, min_lr_ratio=0.5)


def test_spectra_drops_the_peak_midway_and_weight_decay_late():
    """Spectra's TriLM schedule: the lr (whatever the schedule) times lr_drop_ratio from lr_drop_at
    on; weight decay 0 from weight_decay_off_at on, set by the scheduler for each update."""
    linear, dropped = factors(schedule="linear"), factors(schedule="linear", lr_drop_at=0.5)
    assert dropped[:6] == linear[:6] and dropped[6:] == pytest.approx([0.5 * f for f in linear[6:]])  # ceil(5.5)
    config = DenseTraining.Params(steps=10, weight_decay=0.1, weight_decay_off_at=0.7)
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([{"params": [weight], "weight_decay": 0.1}, {"params": [], "weight_decay": 0.0}])
    scheduler, seen = StageSchedule(optimizer, config), []
    for _ in range(10):
        seen.append([g["weight_decay"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen == [[0.1, 0.0]] * 7 + [[0.0, 0.0]] * 3
    with pytest.raises(ValidationError, match=r"lr_drop_at=0.05 falls on step 1 of 11, which is not after the 2 "
                                              "warmup steps"):
        DenseTraining.Params(steps=11, warmup_steps=2, lr_drop_at=0.05)


def test_weight_decay_off_changes_the_run_and_resumes_exactly(tmp_path):
    def make(**extra):
        return dense(checkpoint_every=4, lr=1e-2, weight_decay=0.5, lr_drop_at=0.5, **extra)

    with_decay = nano()
    train(with_decay, pattern_blocks(), *make(), progress=False)
    without_late_decay = nano()
    train(without_late_decay, pattern_blocks(), *make(weight_decay_off_at=0.25), progress=False)
    assert not states_equal(with_decay, without_late_decay)
    # resumed at step 8, after weight decay went off at step 3: the restored groups keep it off
    assert_resume_is_exact(tmp_path, lambda: make(weight_decay_off_at=0.25))


def test_optimizers_train_and_their_state_is_measured():
    facts = {}
    # Adafactor's lr caps a step relative to each parameter's RMS (torch.optim.Adafactor), hence 0.1
    for name, lr in (("adamw", 1e-2), ("sgd", 0.3), ("adafactor", 0.1)):
        config, method = dense(steps=30, lr=lr, optimizer=name)
        result = train(nano(), pattern_blocks(), config, method, progress=False)
        # each one learns the counting pattern (measured: mean loss of the first 5 steps ~3.6, last 5 <= 0.35)
        assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5]), name
        facts[name] = (result.trainable_params, result.optimizer_state_bytes)
    n = facts["adamw"][0]
    assert n == sum(p.numel() for p in nano().parameters())
    assert facts["adamw"][1] == pytest.approx(2 * 4 * n, rel=0.01)  # exp_avg + exp_avg_sq in fp32 (+ steps)
    assert facts["sgd"][1] == pytest.approx(4 * n, rel=0.01)  # one momentum buffer
    assert facts["adafactor"][1] < 0.5 * facts["sgd"][1]  # factored: rows + columns per matrix


def test_freezing_by_pattern_trains_only_the_rest():
    config, method = dense(steps=6, freeze=(r"embed_tokens", r"\.mlp\."))
    model, before = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    trained = {n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert trained and not any("embed_tokens" in n or ".mlp." in n for n in trained)
    assert result.trainable_params == sum(p.numel() for n, p in before.named_parameters()
                                          if "embed_tokens" not in n and ".mlp." not in n)
    assert result.optimizer_state_bytes == pytest.approx(2 * 4 * result.trainable_params, rel=0.01)


def test_a_freeze_that_leaves_nothing_or_does_not_parse_is_refused():
    config, method = dense(steps=2, freeze=(".",))
    with pytest.raises(ValueError, match=r"freeze \['\.'\] matches every parameter"):
        train(nano(), pattern_blocks(), config, method, progress=False)
    with pytest.raises(ValidationError, match=r"freeze pattern '\(' is not a regular expression"):
        DenseTraining.Params(freeze=("(",))


class SgdMethod(DenseTraining):
    """A method that brings its own optimizer through the hook."""

    key = "sgd_method"

    def optimizer(self, model, config):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)


def test_a_method_may_bring_its_own_optimizer():
    config, _ = dense(steps=3)
    model, before = nano(), nano()
    result = train(model, pattern_blocks(), config, SgdMethod(config), progress=False)
    assert states_equal(model, before)  # lr 0: the method's optimizer, not the configured AdamW, stepped
    assert result.optimizer_state_bytes == 0  # plain SGD without momentum keeps no state


def test_a_resume_with_another_optimizer_schedule_and_freeze_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: dense(checkpoint_every=4, optimizer="sgd", lr=0.3, schedule="wsd",
                                                   decay_fraction=0.5, freeze=(r"\.mlp\.",)))


def test_the_monitor_scores_held_out_loss_without_changing_training_and_survives_a_resume(tmp_path):
    from components.train.monitor import ValidationMonitor

    validation = {"count": pattern_blocks(8, seed=5), "other": pattern_blocks(8, seed=6)[:, ::-1].copy()}
    logged = []
    config, method = dense(steps=12, checkpoint_every=4)
    plain_model, monitored_model = nano(), nano()
    plain = train(plain_model, pattern_blocks(), config, method, progress=False)
    monitored = train(monitored_model, pattern_blocks(), config, dense(steps=12)[1], progress=False,
                      monitor=ValidationMonitor(validation, every=4, max_blocks=8),
                      on_log=lambda step, m: logged.append((step, m)))
    assert monitored.losses == plain.losses and states_equal(monitored_model, plain_model)  # no side effects
    history = monitored.monitor_history
    assert [s for s, _ in history["count"]] == [0, 4, 8, 12]
    # the trained pattern's held-out loss falls (measured: 4.15 at step 0, 2.59 at step 12)
    assert history["count"][-1][1] < 0.8 * history["count"][0][1]
    assert {s for s, m in logged if "val_loss_count" in m} == {0, 4, 8, 12}
    facts = monitored.monitor_facts
    assert facts["val_loss_count_start"] == history["count"][0][1] and facts["val_loss_count_end"] == history["count"][-1][1]
    assert facts["val_loss_other_peak"] == max(v for _, v in history["other"])
    # stopped at step 8 and resumed: the same history as the straight run
    train(nano(), pattern_blocks(), config, dense(steps=12, checkpoint_every=4)[1], checkpoint_dir=tmp_path,
          progress=False, stop_after_step=8, monitor=ValidationMonitor(validation, every=4, max_blocks=8))
    resumed = train(nano(), pattern_blocks(), config, dense(steps=12, checkpoint_every=4)[1], checkpoint_dir=tmp_path,
                    progress=False, monitor=ValidationMonitor(validation, every=4, max_blocks=8))
    assert resumed.resumed_from_step == 8 and resumed.monitor_history == history
