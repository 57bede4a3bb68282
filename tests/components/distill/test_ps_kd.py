"""PS-KD: alpha schedule, soft-target loss golden numbers, exact resume with the stored predictions."""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from components.distill.ps_kd import PSKD, alpha_schedule, ps_kd_loss  # noqa: E402
from components.distill.registry import DISTILL_METHODS  # noqa: E402
from components.train.trainer import train  # noqa: E402
from tests.components.distill._helpers import nano, pattern_blocks  # noqa: E402


def test_alpha_schedule_golden():
    # 16 blocks, batch 8, 8 steps -> T = 4 epochs; step 3 rows are positions 16..23 -> epoch 1
    assert alpha_schedule(1, 8, 16, 8, 0.8).tolist() == [0.0] * 8
    assert alpha_schedule(3, 8, 16, 8, 0.8) == pytest.approx([0.2] * 8)
    assert alpha_schedule(8, 8, 16, 8, 0.8) == pytest.approx([0.6] * 8)
    # a batch across an epoch boundary: 12 blocks, batch 8, step 2 -> positions 8..15, epochs 0,0,0,0,1,1,1,1
    assert alpha_schedule(2, 8, 12, 6, 0.8) == pytest.approx([0.0] * 4 + [0.2] * 4)


def test_soft_target_loss_golden():
    # one row, two positions, vocab 3
    log_probs = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]))
    targets = torch.tensor([[0, 1]])
    prev_ids = torch.tensor([[[1, 0], [2, 1]]])
    prev_probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    loss = ps_kd_loss(log_probs, targets, torch.tensor([0.4]), prev_ids, prev_probs)
    # pos0: target = 0.6*[1,0,0] + 0.4*[0.25,0.75,0] = [0.7, 0.3, 0]
    pos0 = -(0.7 * math.log(0.5) + 0.3 * math.log(0.3))
    # pos1: target = 0.6*[0,1,0] + 0.4*[0,0.5,0.5] = [0, 0.8, 0.2]
    pos1 = -(0.8 * math.log(0.6) + 0.2 * math.log(0.3))
    assert loss.item() == pytest.approx((pos0 + pos1) / 2, rel=1e-6)
    plain = ps_kd_loss(log_probs, targets, torch.tensor([0.0]), None, None)
    assert plain.item() == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2, rel=1e-6)


def config(**overrides):
    params = dict(steps=8, batch_size=8, lr=1e-2, precision="fp32", alpha_T=0.8, top_k=4, checkpoint_every=3)
    params.update(overrides)
    return PSKD.Params(**params)


def test_stored_predictions_are_topk_of_own_softmax():
    blocks = pattern_blocks(16)
    method = PSKD(config(steps=2, checkpoint_every=0))
    model = nano(seed=3)
    train(model, blocks, method.params, method, progress=False)  # 2 steps = one epoch: every block stored
    state = method.state_tensors()
    assert state["prev_ids"].shape == (16, 15, 4) and state["prev_probs"].dtype == torch.float16
    sums = state["prev_probs"].float().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=3e-3)
    assert (state["prev_probs"][..., :-1] >= state["prev_probs"][..., 1:]).all()  # sorted top-k


def test_resume_is_bit_exact(tmp_path):
    blocks = pattern_blocks(16)  # 2 steps per epoch, T = 4 epochs
    full_method = PSKD(config())
    full_model = nano(seed=3)
    full = train(full_model, blocks, full_method.params, full_method, checkpoint_dir=tmp_path / "a", progress=False)

    first = PSKD(config())
    train(nano(seed=3), blocks, first.params, first, checkpoint_dir=tmp_path / "b", progress=False, stop_after_step=5)
    resumed_method = PSKD(config())
    resumed_model = nano(seed=3)
    resumed = train(resumed_model, blocks, resumed_method.params, resumed_method, checkpoint_dir=tmp_path / "b",
                    progress=False)
    assert resumed.resumed_from_step == 3  # restored mid-epoch-1 predictions from the step-3 checkpoint
    assert resumed.losses == full.losses
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(full_method.state_tensors()["prev_probs"], resumed_method.state_tensors()["prev_probs"])


def test_self_targets_change_the_loss():
    blocks = pattern_blocks(16)
    with_self = PSKD(config(checkpoint_every=0))
    without = PSKD(config(checkpoint_every=0, alpha_T=0.0))
    a = train(nano(seed=3), blocks, with_self.params, with_self, progress=False).losses
    b = train(nano(seed=3), blocks, without.params, without, progress=False).losses
    assert a[:2] == b[:2]  # epoch 0: alpha = 0, identical
    assert a[2] != b[2]


def test_registry_and_no_teacher():
    assert DISTILL_METHODS.get("ps_kd") is PSKD and not PSKD.needs_teacher
    assert PSKD.paper.arxiv == "2006.12000"


def test_a_run_shorter_than_two_epochs_warns_that_it_is_mostly_plain_cross_entropy(caplog):
    blocks = pattern_blocks(16)  # batch 8: 2 steps per epoch
    with caplog.at_level("WARNING", logger="paperdag.train"):
        short = PSKD(config(steps=3, checkpoint_every=0))
        result = train(nano(seed=3), blocks, short.params, short, progress=False)
    assert "ps_kd: 3 steps of 8 blocks cover 1.50 epochs of the 16 training blocks" in caplog.text
    assert result.method_facts["ps_kd_epochs"] == pytest.approx(1.5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="paperdag.train"):
        long = PSKD(config(steps=8, checkpoint_every=0))  # 4 epochs
        train(nano(seed=3), blocks, long.params, long, progress=False)
    assert "ps_kd" not in caplog.text
