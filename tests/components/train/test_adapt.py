"""AdaPT: per-layer fixed-point formats switched from gradient diversity and a histogram KL test."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.quant.fake_quant import fixed_point
from components.train.adapt import (WORD_BITS_LIMIT, AdaptivePrecisionTraining, histogram_kl, lowest_lossless,
                                    push_up_step, stochastic_fixed_point)
from components.train.registry import PRETRAIN_METHODS
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def adapt(**overrides):
    params = dict(steps=40, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", min_lookback=4, max_lookback=8)
    params.update(overrides)
    config = AdaptivePrecisionTraining.Params(**params)
    return config, AdaptivePrecisionTraining(config)


def test_params_refuse_a_format_without_a_sign_bit_and_crossed_bounds():
    assert PRETRAIN_METHODS.get("adapt") is AdaptivePrecisionTraining
    with pytest.raises(ValidationError, match="frac_bits=8 must be below word_bits=8"):
        AdaptivePrecisionTraining.Params(word_bits=8, frac_bits=8)
    with pytest.raises(ValidationError, match="word_bits"):
        AdaptivePrecisionTraining.Params(word_bits=WORD_BITS_LIMIT + 1)
    with pytest.raises(ValidationError, match="min_lookback=30 exceeds max_lookback=20"):
        AdaptivePrecisionTraining.Params(min_lookback=30, max_lookback=20)
    with pytest.raises(ValidationError, match="min_resolution=9 exceeds max_resolution=5"):
        AdaptivePrecisionTraining.Params(min_resolution=9, max_resolution=5)


def test_stochastic_rounding_lands_on_the_grid_unbiased_and_saturates():
    x = torch.full((200_000,), 0.3)
    q = stochastic_fixed_point(x, 8, 2, torch.Generator().manual_seed(0))
    assert set(q.unique().tolist()) == {0.25, 0.5}  # the two neighbours on the 1/4 grid
    assert float(q.mean()) == pytest.approx(0.3, abs=2e-3)  # up with probability 0.2 / 0.25
    again = stochastic_fixed_point(x, 8, 2, torch.Generator().manual_seed(0))
    assert torch.equal(q, again)  # a seeded generator: a resumed run draws the same
    big = stochastic_fixed_point(torch.tensor([100.0, -100.0]), 8, 2, torch.Generator().manual_seed(0))
    assert big.tolist() == [127 / 4, -128 / 4]
    exact = torch.tensor([0.25, -1.5])  # on the grid already: no dither moves it
    assert torch.equal(stochastic_fixed_point(exact, 8, 2, torch.Generator().manual_seed(1)),
                       fixed_point(exact, 8, 2))
    grad_in = torch.tensor([0.3, 100.0], requires_grad=True)
    stochastic_fixed_point(grad_in, 8, 2, torch.Generator().manual_seed(0)).sum().backward()
    assert grad_in.grad.tolist() == [1.0, 0.0]  # straight through inside, clipped outside


def test_histogram_kl_is_zero_only_for_an_equal_histogram():
    w = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 0.05
    assert histogram_kl(w, w.clone(), 50) == 0.0
    g = torch.Generator().manual_seed(1)
    coarse, fine = stochastic_fixed_point(w, 24, 4, g), stochastic_fixed_point(w, 24, 20, g)
    assert histogram_kl(w, coarse, 50) == math.inf  # 1/16 steps empty most bins
    assert histogram_kl(w, fine, 50) == 0.0  # 2^-20 steps move no value across a bin edge here


def test_lowest_lossless_finds_the_threshold_by_bisection():
    for threshold in range(4, 17):
        calls = []
        found = lowest_lossless(lambda b: calls.append(b) or b < threshold, 4, 16)
        assert found == threshold and len(calls) <= 4
    assert lowest_lossless(lambda b: True, 4, 9) == 9  # nothing lossless: keep the current bits


def test_push_up_follows_the_reference_rule():
    spread = 0.5  # ln(diversity) - 1
    diversity = math.exp(1 + spread)
    s1, s2 = math.ceil(1 / spread**2), min(math.ceil(WORD_BITS_LIMIT * spread**2), WORD_BITS_LIMIT) - 4
    assert (s1, s2) == (4, 2)
    assert push_up_step(diversity, 4, "min") == 2
    assert push_up_step(diversity, 4, "mean") == 3
    assert push_up_step(diversity, 4, "max") == 4
    assert push_up_step(2.0, 4, "max") == 1  # aligned gradients (ln 2 - 1 < 0): one bit
    assert push_up_step(math.inf, 4, "min") == 1  # every gradient quantized to zero


def test_formats_adapt_while_training_and_the_static_control_keeps_its_own():
    facts = {}
    for adaptive in (True, False):
        config, method = adapt(adaptive=adaptive)
        model = nano()
        result = train(model, pattern_blocks(), config, method, progress=False)
        facts[adaptive] = result.method_facts
        assert type(model) is type(nano())  # folded back to the plain model
        assert all(math.isfinite(v) for v in result.losses)
        if adaptive:
            assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])
        # the saved weights are each layer's last re-quantized ones: on its final grid
        for name, (word, frac) in result.method_facts["formats"].items():
            codes = model.get_parameter(f"{name}.weight").detach().double() * 2.0**frac
            assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2 ** (word - 1)
    static, adaptive = facts[False], facts[True]
    assert static["format_switches"] == 0 and static["format_word_bits_mean"] == 8.0
    assert set(map(tuple, static["formats"].values())) == {(8, 4)}
    assert adaptive["format_switches"] > 0 and adaptive["format_word_bits_mean"] > 8.0
    assert all(word >= frac + 8 for word, frac in adaptive["formats"].values())  # the results buffer


def test_gradients_reach_the_optimizer_on_the_layers_grid(monkeypatch):
    config, method = adapt(steps=1, adaptive=False, word_bits=10, frac_bits=6)
    seen = {}
    original = AdaptivePrecisionTraining._on_gradient

    def record(self, index, grad):
        out = original(self, index, grad)
        seen[index] = out
        return out

    monkeypatch.setattr(AdaptivePrecisionTraining, "_on_gradient", record)
    train(nano(), pattern_blocks(), config, method, progress=False)
    assert len(seen) == 14
    for grad in seen.values():
        codes = grad.double() * 2.0**6
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2**9


def test_resume_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: adapt(steps=12, checkpoint_every=4, min_lookback=3, max_lookback=5))
