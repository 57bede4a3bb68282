"""Label-free KD (no CE term) and FerKD's confident-mask targets: golden numbers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

os.environ["HF_HUB_OFFLINE"] = "1"

from components.distill.ferkd import FerKD, ferkd_targets  # noqa: E402
from components.distill.label_free_kd import LabelFreeKD  # noqa: E402
from components.distill.registry import DISTILL_METHODS  # noqa: E402
from components.train.trainer import train  # noqa: E402
from tests.components.distill._helpers import VOCAB, nano, pattern_blocks  # noqa: E402


def test_label_free_loss_is_kl_only():
    teacher, student = nano(seed=1), nano(seed=2)
    method = LabelFreeKD(LabelFreeKD.Params(temperature=2.0))
    batch = torch.from_numpy(pattern_blocks()[:3].astype(np.int64))
    loss = method.loss(student, batch, teacher)
    s = student(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)
    with torch.no_grad():
        t = teacher(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()
    assert loss.item() == pytest.approx(4.0 * kl.item(), rel=1e-5)
    # no hard-label term: a student equal to the teacher has zero loss although its CE is not zero
    assert method.loss(teacher, batch, teacher).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValidationError):
        LabelFreeKD.Params(alpha=0.5)
    assert DISTILL_METHODS.get("label_free_kd") is LabelFreeKD and LabelFreeKD.paper.arxiv == "2103.05959"


def test_ferkd_targets_golden():
    # position 0: teacher max prob 0.8 >= 0.6 -> soft label; position 1: max 0.5 -> smoothed one-hot
    teacher_logits = torch.log(torch.tensor([[0.8, 0.1, 0.1, 0.0 + 1e-12], [0.5, 0.3, 0.1, 0.1]]))
    targets = torch.tensor([2, 1])
    target, confident = ferkd_targets(teacher_logits, targets, threshold=0.6, label_smoothing=0.2)
    assert confident.tolist() == [True, False]
    assert target[0].tolist() == pytest.approx([0.8, 0.1, 0.1, 0.0], abs=1e-6)
    assert target[1].tolist() == pytest.approx([0.05, 0.85, 0.05, 0.05], abs=1e-6)


def test_ferkd_loss_and_facts():
    teacher = nano(seed=1)
    batch = torch.from_numpy(pattern_blocks()[:2].astype(np.int64))
    with torch.no_grad():
        t = teacher(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)
    threshold = float(F.softmax(t, -1).amax(-1).median())  # about half the positions are confident
    params = FerKD.Params(steps=4, batch_size=4, lr=1e-2, precision="fp32", threshold=threshold, label_smoothing=0.1)
    method = FerKD(params)
    student = nano(seed=2)
    loss = method.loss(student, batch, teacher)
    target, confident = ferkd_targets(t, batch[:, 1:].reshape(-1), threshold, 0.1)
    assert 0 < confident.float().mean() < 1
    s = F.log_softmax(student(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB), -1)
    assert loss.item() == pytest.approx(-(target * s).sum(-1).mean().item(), rel=1e-5)
    result = train(nano(seed=2), pattern_blocks(), params, FerKD(params), teacher=teacher, progress=False)
    assert 0 < result.method_facts["ferkd_confident_fraction"] < 1  # neither every token nor none
    assert DISTILL_METHODS.get("ferkd") is FerKD and FerKD.paper.arxiv == "2312.17473"
