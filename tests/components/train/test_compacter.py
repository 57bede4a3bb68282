"""Compacter: the update is a Kronecker sum with factors shared by every layer and low-rank layer
factors, it starts at zero, only the factors train (a rank-r LoRA's count plus n^3 shared), the
artifact is a plain Llama holding W + update, and a resume is exact."""
from __future__ import annotations

import pytest
import torch

from components.train.compacter import CompacterError, CompacterFinetune, PhmLinear, kronecker_sum
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def compacter(**overrides):
    params = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", phm_dim=4, rank=1, alpha=2.0)
    params.update(overrides)
    config = CompacterFinetune.Params(**params)
    return config, CompacterFinetune(config)


def test_the_update_is_a_sum_of_kronecker_products_that_can_reach_rank_n_squared():
    gen = torch.Generator().manual_seed(0)
    shared, left, right = (torch.randn(4, 4, 4, generator=gen), torch.randn(4, 6, 1, generator=gen),
                           torch.randn(4, 1, 5, generator=gen))
    expected = sum(torch.kron(shared[i], left[i] @ right[i]) for i in range(4))
    torch.testing.assert_close(kronecker_sum(shared, left, right), expected)
    # 4 rank-1 B_i, each Kronecker'd with a full-rank 4 x 4 A_i: rank up to 16 from 4 * (6 + 5) numbers
    assert torch.linalg.matrix_rank(expected) == 16


def test_the_layer_starts_as_the_pretrained_linear_and_folds_to_w_plus_the_update():
    linear = torch.nn.Linear(16, 8)
    shared = torch.nn.Parameter(torch.randn(2, 2, 2))
    layer = PhmLinear(linear, shared, rank=2, alpha=4.0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), linear(x))  # s_i start at zero
    with torch.no_grad():
        layer.phm_left.normal_()
    expected = linear.weight + 2.0 * sum(torch.kron(shared[i], layer.phm_left[i] @ layer.phm_right[i])
                                         for i in range(2))
    torch.testing.assert_close(layer.folded().weight, expected)
    torch.testing.assert_close(layer(x), x @ expected.T + linear.bias)


def test_only_the_factors_train_and_the_artifact_is_a_plain_llama():
    config, method = compacter(steps=40)
    model, base = nano(), nano()
    captured = {}
    original = method.finalize

    def finalize(m):
        captured["shared"] = {id(layer.phm_shared) for layer in method.replaced(m).values()}
        return original(m)

    method.finalize = finalize
    result = train(model, pattern_blocks(), config, method, progress=False)
    # the frozen random model learns through the projections' updates only (measured: mean loss of
    # the first 5 steps 4.11, of the last 5 3.54)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.25
    linears = [m for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(captured["shared"]) == 1  # one A shared by every layer
    assert result.trainable_params == sum(m.in_features + m.out_features for m in linears) + 4 ** 3
    assert result.trainable_params < 0.1 * sum(p.numel() for p in base.parameters())
    assert result.method_facts["compacter_layers"] == len(linears)
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert all(type(m) is torch.nn.Linear for m in model.model.layers.modules() if hasattr(m, "in_features"))
    # frozen: the embeddings, norms and head are the pretrained ones; the projections moved
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, base.model.norm.weight)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_a_compacter_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: compacter(checkpoint_every=4))


def test_widths_phm_dim_does_not_divide_and_too_large_a_rank_are_refused_by_name():
    with pytest.raises(CompacterError, match=r"phm_dim=3 does not divide the widths of .* \(\d+ x \d+\)"):
        train(nano(), pattern_blocks(), *compacter(phm_dim=3), progress=False)
    with pytest.raises(CompacterError, match=r"rank=17 is larger than layer"):
        train(nano(), pattern_blocks(), *compacter(rank=17), progress=False)
