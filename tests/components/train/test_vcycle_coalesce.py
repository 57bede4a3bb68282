"""The V-cycle's coalesce step as a training method: the trainer trains (and hands back) the
coalesced model, and factors that do not divide the model are refused by name."""
from __future__ import annotations

import pytest

from components.train.registry import FINETUNE_METHODS
from components.train.trainer import train
from components.train.vcycle_coalesce import VCycleCoalesce
from tests.components.train.test_trainer import nano, pattern_blocks


def coalesce(**overrides):
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32", width_factor=2, depth_factor=2)
    params.update(overrides)
    config = VCycleCoalesce.Params(**params)
    return config, VCycleCoalesce(config)


def test_the_trainer_trains_and_returns_the_coalesced_model():
    config, method = coalesce()
    model = nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size,
            model.config.num_hidden_layers) == (32, 1, 96, 1)
    assert result.trainable_params == sum(p.numel() for p in model.parameters())
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert result.method_facts["coalesced_from"]["hidden_size"] == 64


def test_factors_that_do_not_divide_are_refused_by_name():
    config, method = coalesce(width_factor=3)
    with pytest.raises(ValueError, match=r"params.width_factor=3, depth_factor=2: coalescing by width_factor=3: "
                                         r"hidden_size=64 is not divisible by it"):
        train(nano(), pattern_blocks(), config, method, progress=False)


def test_registered_as_a_finetune_method():
    assert FINETUNE_METHODS.get("vcycle_coalesce") is VCycleCoalesce
