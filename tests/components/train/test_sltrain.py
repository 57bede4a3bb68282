"""SLTrain: the sparse + low-rank layer computes what its folded Linear computes, only the factors
and sparse values train, the artifact is a plain Llama, its settings give the paper's baselines,
FLOPs are the dense model's, and a resume is exact."""
from __future__ import annotations

import pytest
import torch

from components.train.dense import DenseTraining
from components.train.sltrain import SLTrain, SLTrainError, SparseLowRankLinear
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def sltrain(**overrides):
    params = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", rank=4, alpha=8.0,
                  sparse_ratio=0.05)
    params.update(overrides)
    config = SLTrain.Params(**params)
    return config, SLTrain(config)


def test_the_layer_is_low_rank_plus_a_fixed_support_sparse_matrix():
    torch.manual_seed(0)
    layer = SparseLowRankLinear(torch.nn.Linear(24, 16, bias=False), rank=3, alpha=6.0, sparse_ratio=0.1,
                                train_sparse=True)
    assert layer.sparse_value.numel() == int(0.1 * 24 * 16) and layer.sparse_index.unique().numel() == 38
    assert torch.count_nonzero(layer.effective_weight()) == 38  # B starts at zero: only S at first
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)
    expected = x @ (2.0 * layer.lora_B @ layer.lora_A).T
    expected += x @ torch.zeros(16 * 24).index_put_((layer.sparse_index,), layer.sparse_value).view(16, 24).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.folded()(x), expected, atol=1e-5)
    low_rank_only = SparseLowRankLinear(torch.nn.Linear(24, 16, bias=False), 3, 6.0, 0.0, True)
    weight = low_rank_only.effective_weight()
    assert low_rank_only.sparse_value.numel() == 0 and torch.linalg.matrix_rank(weight) == 3  # B A, B not zero


def test_the_low_rank_only_baseline_learns_in_its_blocks():
    """A zero B with no sparse part would leave every block output and gradient zero (it did, in
    the first sltrain recipe run): the low-rank baseline's factors must move."""
    factors = {}

    class Capture(SLTrain):
        def prepare(self, model):
            super().prepare(model)
            factors["start"] = [m.lora_B.detach().clone() for m in self.replaced(model).values()]

        def finalize(self, model):
            factors["end"] = [m.lora_B.detach().clone() for m in self.replaced(model).values()]
            return super().finalize(model)

    config, _ = sltrain(sparse_ratio=0.0)
    train(nano(), pattern_blocks(), config, Capture(config), progress=False)
    assert all(not torch.equal(a, b) for a, b in zip(factors["start"], factors["end"]))


def test_only_factors_and_sparse_values_train_and_the_artifact_is_a_plain_llama():
    config, method = sltrain(steps=40)
    model, base = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    # the counting pattern is learned (measured: mean loss of the first 5 steps 3.26, of the last 5 0.007)
    assert sum(result.losses[-5:]) < 0.3 * sum(result.losses[:5])
    linears = [m for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    block = sum(4 * (m.in_features + m.out_features) + int(0.05 * m.in_features * m.out_features) for m in linears)
    others = sum(p.numel() for n, p in base.named_parameters() if ".layers." not in n or "norm" in n)
    assert result.trainable_params == block + others
    assert result.method_facts["sltrain_layers"] == len(linears)
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert all(type(m) is torch.nn.Linear for m in model.model.layers.modules() if hasattr(m, "in_features"))


def test_frozen_sparse_values_stay_at_their_initialisation():
    captured = {}

    class Capture(SLTrain):
        def prepare(self, model):
            super().prepare(model)
            captured.update({n: m.sparse_value.detach().clone() for n, m in self.replaced(model).items()})

        def finalize(self, model):
            captured["after"] = {n: m.sparse_value.detach().clone() for n, m in self.replaced(model).items()}
            return super().finalize(model)

    config, _ = sltrain(train_sparse=False)
    result = train(nano(), pattern_blocks(), config, Capture(config), progress=False)
    after = captured.pop("after")
    assert after.keys() == captured.keys() and all(torch.equal(after[n], captured[n]) for n in after)
    trained_config, _ = sltrain()
    trained = train(nano(), pattern_blocks(), trained_config, SLTrain(trained_config), progress=False)
    assert trained.trainable_params - result.trainable_params == sum(v.numel() for v in after.values())


def test_flops_are_counted_as_the_dense_matmuls_it_runs():
    config, method = sltrain()
    model = nano()
    method.prepare(model)
    assert method.flops_per_token(model, 16) == DenseTraining().flops_per_token(nano(), 16)


def test_an_sltrain_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: sltrain(checkpoint_every=4))


def test_a_rank_above_a_layer_is_refused_by_name():
    with pytest.raises(SLTrainError, match=r"params\.rank=65 is larger than layer .* \(min\(in, out\) = 64\)"):
        train(nano(), pattern_blocks(), *sltrain(rank=65), progress=False)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_a_sparse_ratio_outside_zero_to_one_is_refused_naming_it(ratio):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"sparse_ratio\n  Input should be (greater than or equal to 0|less than 1)"):
        SLTrain.Params(sparse_ratio=ratio)
    assert SLTrain.Params(sparse_ratio=0.0).sparse_ratio == 0.0  # low-rank only: the recipe's baseline


@pytest.mark.parametrize("key", ["sltrain", "qat", "sr_ste", "perp", "lora"])
def test_every_stand_in_trains_under_bf16_autocast(key):
    """The catalogue trains in bf16 where the CPU has it; a stand-in must not mix dtypes there."""
    from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS
    from tests.components.train.test_perp import pruned_nano

    cls = (PRETRAIN_METHODS if key != "perp" else FINETUNE_METHODS).get(key)
    extra = {"rank": 4} if key in ("sltrain", "perp", "lora") else {}
    config = cls.Params(steps=3, batch_size=4, lr=1e-3, precision="bf16", **extra)
    model = pruned_nano() if key == "perp" else nano()
    result = train(model, pattern_blocks(), config, cls(config), progress=False)
    assert result.precision == "bf16" and len(result.losses) == 3
