"""Feature KD: learned projection across widths, clean saved student, partial teacher FLOPs."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ["HF_HUB_OFFLINE"] = "1"

from components.distill.feature_kd import PROJECTION_ATTR, FeatureKD  # noqa: E402
from components.distill.registry import DISTILL_METHODS  # noqa: E402
from components.train.method import attention_width, forward_flops_per_token  # noqa: E402
from components.train.trainer import train  # noqa: E402
from tests.components.distill._helpers import SEQ, nano, pattern_blocks  # noqa: E402


def wide_teacher():
    # 3 layers, width 96: differs from the nano student (2 layers, width 64)
    return nano(seed=1, hidden_size=96, num_hidden_layers=3, intermediate_size=192)


def method(**overrides):
    params = dict(steps=6, batch_size=4, lr=1e-2, precision="fp32", feature_weight=1.0)
    params.update(overrides)
    return FeatureKD(FeatureKD.Params(**params))


def test_projection_trains_and_is_removed():
    teacher, student = wide_teacher(), nano(seed=2)
    kd = method()
    seen = {}
    original_after_step = kd.after_step

    def after_step(model):  # snapshot the projection while it is attached
        seen.setdefault("first", getattr(model, PROJECTION_ATTR)["2"].weight.detach().clone())
        seen["last"] = getattr(model, PROJECTION_ATTR)["2"].weight.detach().clone()
        original_after_step(model)

    kd.after_step = after_step
    plain_keys = set(nano(seed=2).state_dict())
    result = train(student, pattern_blocks(), kd.params, kd, teacher=teacher, progress=False)
    assert seen["first"].shape == (96, 64)
    assert not torch.equal(seen["first"], seen["last"])  # the optimizer updates the projection
    assert not hasattr(student, PROJECTION_ATTR)
    assert set(student.state_dict()) == plain_keys  # saved model is a plain LlamaForCausalLM
    assert result.method_facts["feature_kd_layer_map"] == {"2": 3}
    assert all(np.isfinite(result.losses))


def test_loss_is_ce_plus_projected_mse():
    teacher, student = wide_teacher(), nano(seed=2)
    kd = method(layer_map={1: 2, 2: 3}, feature_weight=0.5)
    kd.bind(student, teacher, 32)
    batch = torch.from_numpy(pattern_blocks()[:3].astype(np.int64))
    loss = kd.loss(student, batch, teacher)
    with torch.no_grad():
        t_states = teacher(input_ids=batch, output_hidden_states=True).hidden_states
    s_out = student(input_ids=batch, output_hidden_states=True)
    proj = getattr(student, PROJECTION_ATTR)
    # hidden_states[l] for l < n_layers are pre-norm block outputs in HF; the last one is checked via hooks below
    ce = F.cross_entropy(s_out.logits[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))
    mse1 = F.mse_loss(proj["1"](s_out.hidden_states[1]), t_states[2])
    # layer 2 of the student / 3 of the teacher (last blocks): capture pre-norm outputs with hooks
    caught = {}
    h1 = student.model.layers[1].register_forward_hook(lambda m, i, o: caught.__setitem__("s", o))
    h2 = teacher.model.layers[2].register_forward_hook(lambda m, i, o: caught.__setitem__("t", o))
    with torch.no_grad():
        student(input_ids=batch), teacher(input_ids=batch)
    h1.remove(), h2.remove()
    mse2 = F.mse_loss(proj["2"](caught["s"]), caught["t"])
    expected = ce + 0.5 * (mse1 + mse2) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_partial_teacher_runs_only_k_layers_and_counts_their_flops():
    teacher, student = wide_teacher(), nano(seed=2)
    calls = [0, 0, 0]
    for i, layer in enumerate(teacher.model.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    head_calls = []
    teacher.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    kd = method(teacher_layers=1)
    result = train(student, pattern_blocks(), kd.params, kd, teacher=teacher, progress=False)
    assert calls == [6, 0, 0] and not head_calls
    assert result.method_facts["teacher_layers_run"] == 1
    # teacher: 2 * (linears of block 0) + 2 * 1 layer * seq * d_attn; student incl. projection (3x forward)
    block0 = sum(m.weight.numel() for m in teacher.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    student_fwd = forward_flops_per_token(nano(seed=2), SEQ) + 2 * 64 * 96
    d_attn = attention_width(teacher)[1]  # heads * head_dim
    expected = 3 * student_fwd + 2 * block0 + 2 * 1 * SEQ * d_attn
    assert result.train_flops == pytest.approx(expected * result.tokens)


def test_partial_teacher_needs_alpha_zero_and_valid_depth():
    with pytest.raises(ValueError, match="alpha must be 0"):
        FeatureKD.Params(teacher_layers=1, alpha=0.5)
    kd = method(teacher_layers=5)
    with pytest.raises(ValueError, match="teacher_layers=5 but the teacher has 3 layers"):
        kd.bind(nano(seed=2), wide_teacher(), 32)


def test_same_width_has_no_projection_and_self_distillation_config():
    teacher, student = nano(seed=1), nano(seed=2)
    kd = method(alpha=0.0, feature_weight=1.0)
    result = train(student, pattern_blocks(), kd.params, kd, teacher=teacher, progress=False)
    assert not hasattr(student, PROJECTION_ATTR)
    assert DISTILL_METHODS.get("feature_kd") is FeatureKD and FeatureKD.paper.arxiv == "2208.12256"
    assert result.losses[-1] < result.losses[0]
