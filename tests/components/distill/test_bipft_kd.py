"""BiPFT's pretraining objective: the binary network trained on cross-entropy plus the MSE of
every hidden state to the full-precision teacher's (the reference's ``KDLearner``), with the
teacher's blocks counted in the FLOPs, folded and packed as ``bipft`` does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.distill.bipft_kd import BiPFTKD
from components.distill.feature_kd import capture_hidden_states, partial_forward_flops_per_token
from components.distill.registry import DISTILL_METHODS
from components.model.binary_network import BinaryLinear
from components.train.bipft import BiPFTTraining
from components.train.method import forward_flops_per_token
from components.train.trainer import train
from tests.components.distill._helpers import VOCAB, nano, pattern_blocks, trained_teacher


@pytest.fixture(scope="module")
def teacher():
    return trained_teacher()


def bipft_kd(**overrides):
    params = dict(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32")
    params.update(overrides)
    config = BiPFTKD.Params(**params)
    return config, BiPFTKD(config)


def test_registered_with_the_references_weights():
    assert DISTILL_METHODS.get("bipft_kd") is BiPFTKD and BiPFTKD.needs_teacher
    params = BiPFTKD.Params()
    assert (params.alpha, params.feature_weight, params.estimators, params.layer_map) == (0.0, 1.0, True, None)
    with pytest.raises(ValueError, match="teacher_layers=1 runs a partial teacher"):
        BiPFTKD.Params(alpha=0.5, teacher_layers=1)


def test_the_loss_is_cross_entropy_plus_the_mean_mse_of_every_hidden_state(teacher):
    _, method = bipft_kd()
    student = nano(seed=2)
    method.prepare(student)
    method.bind(student, teacher, 32)
    assert isinstance(student.model.layers[0].mlp.down_proj, BinaryLinear)
    batch = torch.from_numpy(pattern_blocks()[:4].astype(np.int64))
    loss = method.loss(student, batch, teacher)
    every = set(range(len(student.model.layers) + 1))  # embeddings and each block's output
    with torch.no_grad(), capture_hidden_states(teacher, every) as t_states:
        teacher(input_ids=batch)
    with torch.no_grad(), capture_hidden_states(student, every) as s_states:
        logits = student(input_ids=batch).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    mse = sum(F.mse_loss(s_states[i], t_states[i]) for i in every) / len(every)
    assert loss.item() == pytest.approx((ce + mse).item(), rel=1e-5)
    assert mse.item() > 0.01 * ce.item()  # the feature term is not negligible here

    # FLOPs, counted on the installed binary network as the trainer counts them
    alone = BiPFTTraining(BiPFTTraining.Params()).flops_per_token(student, 16)
    assert alone > 3.0 * forward_flops_per_token(student, 16)  # BiPFT's binary products are in it
    assert method.flops_per_token(student, 16, teacher) == pytest.approx(
        alone + partial_forward_flops_per_token(teacher, 16, 2))


def test_a_teacher_of_another_depth_needs_a_layer_map(teacher):
    _, method = bipft_kd()
    student = nano(seed=2, num_hidden_layers=3)
    method.prepare(student)
    with pytest.raises(ValueError, match=r"needs a teacher as deep as the student \(3 layers\), got 2; give "
                                         r"params.layer_map"):
        method.bind(student, teacher, 32)


def test_it_trains_folds_and_packs_as_bipft(teacher):
    config, method = bipft_kd(steps=20)
    student = nano(seed=2)
    result = train(student, pattern_blocks(), config, method, teacher=teacher, progress=False)
    facts = result.method_facts
    assert facts["feature_kd_layer_map"] == {"0": 0, "1": 1, "2": 2} and facts["binary_layers"] == 14
    assert not any(isinstance(m, BinaryLinear) for m in student.modules())
    quantized = method.pack(student)
    assert {t["format"] for t in quantized.meta["tensors"].values()} == {"sign"}
    assert sum(result.losses[-3:]) < 0.8 * sum(result.losses[:3])
