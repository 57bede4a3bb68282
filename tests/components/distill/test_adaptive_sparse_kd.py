"""AST's retraining with distillation: SR-STE's adaptive 2:4 layers trained on logit KD's loss at
AST's settings (T = 2, 0.67 KD + 0.33 CE), saved exactly 2:4, with the teacher's forward counted
in the FLOPs; the teacher pulls the sparse student towards it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.distill.adaptive_sparse_kd import AdaptiveSparseKD
from components.distill.registry import DISTILL_METHODS
from components.train.method import forward_flops_per_token
from components.train.sr_ste import AdaptiveNMLinear, SrSteTraining
from components.train.trainer import train
from tests.components.distill._helpers import VOCAB, nano, pattern_blocks, trained_teacher


@pytest.fixture(scope="module")
def teacher():
    return trained_teacher()


def ast_kd(**overrides):
    params = dict(steps=20, batch_size=8, lr=1e-2, precision="fp32")
    params.update(overrides)
    config = AdaptiveSparseKD.Params(**params)
    return config, AdaptiveSparseKD(config)


def test_registered_with_asts_defaults():
    assert DISTILL_METHODS.get("ast_kd") is AdaptiveSparseKD and AdaptiveSparseKD.needs_teacher
    params = AdaptiveSparseKD.Params()
    assert (params.temperature, params.alpha, params.direction) == (2.0, 0.67, "forward")
    assert (params.pattern, params.decay) == ("2:4", 1e-4)
    with pytest.raises(ValueError, match="pattern '3:2'"):
        AdaptiveSparseKD.Params(pattern="3:2")


def test_the_loss_is_asts_on_the_masked_student(teacher):
    _, method = ast_kd()
    student = nano(seed=2)
    method.prepare(student)
    assert all(isinstance(m, AdaptiveNMLinear) for m in method.replaced(student).values())
    batch = torch.from_numpy(pattern_blocks()[:4].astype(np.int64))
    loss = method.loss(student, batch, teacher)
    s = student(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)  # through the 2:4 layers
    with torch.no_grad():
        t = teacher(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum") * 4 / s.shape[0]
    ce = F.cross_entropy(s, batch[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx((0.67 * kl + 0.33 * ce).item(), rel=1e-5)


def test_flops_add_the_teachers_forward_to_sr_stes(teacher):
    config, method = ast_kd()
    student = nano(seed=2)
    method.prepare(student)
    alone = SrSteTraining(SrSteTraining.Params()).flops_per_token(student, 16)
    assert method.flops_per_token(student, 16, teacher) == pytest.approx(alone + forward_flops_per_token(teacher, 16))


def test_the_teacher_pulls_the_2_4_student_and_it_saves_exactly_2_4(teacher):
    gaps = {}
    for alpha in (0.67, 0.0):  # alpha 0: the same 2:4 retraining on cross-entropy alone
        config, method = ast_kd(alpha=alpha, steps=30)
        student = nano(seed=2)
        result = train(student, pattern_blocks(), config, method, teacher=teacher, progress=False)
        assert result.method_facts["sr_ste_layers"] == 14
        for name, module in student.named_modules():
            if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
                rows = module.weight.detach().reshape(module.out_features, -1, 4)
                assert bool(((rows != 0).sum(-1) <= 2).all()), name
        batch = torch.from_numpy(pattern_blocks()[:16].astype(np.int64))
        with torch.no_grad():
            s, t = student(input_ids=batch).logits, teacher(input_ids=batch).logits
        gaps[alpha] = float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))
    assert gaps[0.67] < 0.8 * gaps[0.0]
