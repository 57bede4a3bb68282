"""PELA: SVD factorization at PELA's rank rule, the factorized forward, feature distillation of
every block from the original model, the residual regularizer, and a plain saved model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from components.distill.feature_kd import capture_hidden_states
from components.distill.pela import Pela, PelaError, SvdLowRankLinear, pela_rank
from components.distill.registry import DISTILL_METHODS
from components.train.method import forward_flops_per_token
from components.train.trainer import train
from tests.components.distill._helpers import SEQ, nano, pattern_blocks


def pela(**overrides) -> Pela:
    params = dict(steps=8, batch_size=4, lr=3e-3, precision="fp32", log_every=1)
    params.update(overrides)
    return Pela(Pela.Params(**params))


def test_registered_with_its_paper_and_validated_params():
    assert DISTILL_METHODS.get("pela").paper.arxiv == "2310.10700"
    with pytest.raises(ValidationError, match="compression_ratio"):
        Pela.Params(compression_ratio=1.0)
    with pytest.raises(ValidationError, match="inf_norm_weight"):
        Pela.Params(inf_norm_weight=-1)


def test_the_svd_factors_are_the_best_rank_r_approximation_and_the_forward_runs_them():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32)
    rank = pela_rank(48, 32, 2.0)
    assert rank == 48 * 32 // (2 * 80) == 9
    module = SvdLowRankLinear(linear, rank)
    assert module.down.shape == (9, 48) and module.up.shape == (32, 9)
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    best = (u[:, :9] * s[:9]) @ vh[:9]  # Eckart-Young: the truncated SVD
    assert torch.allclose(module.effective_weight(), best, atol=1e-5)
    assert torch.allclose(module.up.norm(dim=0), module.down.norm(dim=1), atol=1e-5)  # sqrt(S) on each side
    x = torch.randn(5, 48)
    assert torch.allclose(module(x), F.linear(x, best, linear.bias), atol=1e-5)
    assert torch.allclose(module.folded()(x), module(x), atol=1e-5)
    full = SvdLowRankLinear(linear, 32)  # full rank reproduces the layer
    assert torch.allclose(full(x), linear(x), atol=1e-5)


def test_a_ratio_that_leaves_no_rank_is_refused_naming_the_layer():
    with pytest.raises(PelaError, match=r"compression_ratio=100.0 leaves layer model\.layers\.0\.mlp\.down_proj no rank"):
        pela(compression_ratio=100.0).prepare(nano(seed=0))


def test_every_block_is_distilled_from_the_original_and_the_saved_model_is_plain():
    teacher = nano(seed=0)
    student = copy.deepcopy(teacher)
    method = pela()
    result = train(student, pattern_blocks(), method.params, method, teacher=teacher, progress=False)
    facts = result.method_facts
    assert facts["feature_kd_layer_map"] == {"1": 1, "2": 2}  # every block of the 2-layer nano
    assert facts["pela_layers"] == 14 and facts["pela_compression_ratio"] == 2.0
    ranks = facts["pela_ranks"]
    assert ranks["model.layers.0.self_attn.q_proj"] == pela_rank(64, 64, 2.0) == 16
    assert facts["low_rank_params"] < 0.52 * facts["replaced_dense_params"]
    assert type(student) is type(teacher) and student.state_dict().keys() == teacher.state_dict().keys()
    weight = student.get_parameter("model.layers.1.mlp.up_proj.weight").detach()
    assert torch.linalg.matrix_rank(weight).item() == ranks["model.layers.1.mlp.up_proj"]  # folded, still rank r

    # the loss is CE plus the mean block-output MSE against the original model
    check, batch = pela(), torch.as_tensor(pattern_blocks()[:4]).long()
    fresh = copy.deepcopy(teacher)
    check.prepare(fresh)
    check.bind(fresh, teacher, 32)
    with torch.no_grad():
        with capture_hidden_states(teacher, {1, 2}) as want:
            teacher(input_ids=batch)
        with capture_hidden_states(fresh, {1, 2}) as got:
            ce = fresh(input_ids=batch, labels=batch).loss
        expected = ce + (F.mse_loss(got[1], want[1]) + F.mse_loss(got[2], want[2])) / 2
        assert torch.allclose(check.loss(fresh, batch, teacher), expected, atol=1e-5)


def test_svd_alone_never_runs_the_teacher_and_counts_no_teacher_flops():
    teacher = nano(seed=0)
    student = copy.deepcopy(teacher)  # before the hook: a deep copy would copy it too
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    method = pela(feature_weight=0.0)
    result = train(student, pattern_blocks(), method.params, method, teacher=teacher, progress=False)
    assert calls == [] and "feature_kd_layer_map" not in result.method_facts
    distilled, plain = pela(), pela(feature_weight=0.0)
    for m in (distilled, plain):
        m.prepare(model := copy.deepcopy(student))
        m.bind(model, teacher, 32)
    thin = plain.low_rank_flops(model)
    assert 0 < thin < 2 * 0.52 * 2 * (64 * 64 * 4 + 64 * 192 * 3)  # about half of the dense blocks' matmuls
    assert plain.flops_per_token(model, SEQ, teacher) == 3 * (forward_flops_per_token(model, SEQ) + thin)
    assert distilled.flops_per_token(model, SEQ, teacher) > plain.flops_per_token(model, SEQ, teacher)


def test_the_residual_regularizer_is_the_largest_entry_against_the_original():
    teacher = nano(seed=0)
    method = pela(feature_weight=0.0, inf_norm_weight=1.0, inf_norm_eps=1e-3)
    student = copy.deepcopy(teacher)
    method.prepare(student)
    terms = []
    for name, module in method.replaced(student).items():
        residual = module.effective_weight() - teacher.get_submodule(name).weight
        terms.append((residual.abs().max() - 1e-3) ** 2)
    assert torch.allclose(method.residual_penalty(student, teacher), torch.stack(terms).mean())
    batch = torch.as_tensor(pattern_blocks()[:4]).long()
    with torch.no_grad():
        plain = student(input_ids=batch, labels=batch).loss
        assert torch.allclose(method.loss(student, batch, teacher), plain + torch.stack(terms).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="add a `teacher` input"):
        method.residual_penalty(student, None)
