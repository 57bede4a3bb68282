"""The model health check catches the broken merges and quantizers that once scored as results."""
from __future__ import annotations

import pytest
import torch

from components.model.health import DegenerateModelError, check_model_health
from components.model.presets import build_model


def nano():
    return build_model("nano", vocab_size=128, max_seq_len=32, seed=0)


def test_a_fresh_model_is_healthy_and_left_as_it_was():
    model = nano()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_model_health(model, "nano")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overflowed_weights_are_named():
    model = nano()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e38).mul_(1e38)  # what `scaling: 1e38` did
    with pytest.raises(DegenerateModelError, match=r"merged: parameter model\.layers\.0\.mlp\.up_proj\.weight has \d+ non-finite"):
        check_model_health(model, "merged")


def test_finite_weights_with_non_finite_outputs():
    model = nano()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e18)  # finite, but the activations overflow
    with pytest.raises(DegenerateModelError, match="outputs are not finite"):
        check_model_health(model, "scaled")


def test_collapsed_outputs_are_refused():
    model = nano()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token gets the same logit: a uniform distribution
    with pytest.raises(DegenerateModelError, match="collapsed to a uniform distribution"):
        check_model_health(model, "collapsed")
