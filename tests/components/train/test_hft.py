"""Half Fine-Tuning: half of the block weights train, the frozen half is untouched, each seed
draws its own half, and a resume is exact."""
from __future__ import annotations

import pytest
import torch

from components.train.hft import HalfFinetune
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def hft(**overrides):
    params = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32")
    params.update(overrides)
    config = HalfFinetune.Params(**params)
    return config, HalfFinetune(config)


def test_half_of_the_block_weights_train_and_the_frozen_half_is_untouched():
    config, method = hft()
    model, before = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    frozen = result.method_facts["hft_frozen_modules"]
    per_layer = [[n for n in frozen if n.startswith(f"model.layers.{i}.")] for i in range(2)]
    assert all(sum(".self_attn." in n for n in layer) == 2 for layer in per_layer)
    assert sorted(sum(".mlp." in n for n in layer) for layer in per_layer) == [1, 2]
    assert result.method_facts["hft_frozen_block_fraction"] == 0.5  # nano: equal-sized q/k/v/o and gate/up/down
    params_before = dict(before.named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params_before[n])}
    assert not changed & {f"{n}.weight" for n in frozen}
    linears = {f"{n}.weight" for n, m in before.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {f"model.{n}" for n in linears} - {f"{n}.weight" for n in frozen} <= changed
    assert "model.embed_tokens.weight" in changed  # not part of the scheme: trains
    assert all(p.requires_grad for p in model.parameters())  # saved as an ordinary model


def test_each_seed_draws_its_own_half():
    draws = {tuple(hft(seed=seed)[1].frozen_modules(4)) for seed in range(6)}
    assert len(draws) == 6  # six seeds, six different halves
    for draw in draws:  # each one half: 2 of 4 attention projections per layer, 6 of 12 MLP ones in all
        assert all(sum(f"layers.{i}.self_attn." in name for name in draw) == 2 for i in range(4))
        assert sum(".mlp." in name for name in draw) == 6
    assert hft(seed=3)[1].frozen_modules(4) == hft(seed=3)[1].frozen_modules(4)


def test_an_hft_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: hft(checkpoint_every=4))


def test_hft_is_a_finetune_method_only():
    from components.registry import UnknownMethodError
    from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS

    assert FINETUNE_METHODS.get("hft") is HalfFinetune
    with pytest.raises(UnknownMethodError, match="hft"):
        PRETRAIN_METHODS.get("hft")
