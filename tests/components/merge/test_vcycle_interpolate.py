"""The V-cycle's interpolation merge: the small model is de-coalesced into the base's shapes and
mixed with the base by alpha; inputs it cannot combine are refused by name."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.merge.base import MergeError
from components.merge.registry import MERGERS
from components.merge.vcycle_interpolate import VCycleInterpolate
from components.model.growth import coalesce_llama, decoalesce_state_dict
from components.model.presets import build_model


def large():
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=0)


def interpolate(**params):
    return VCycleInterpolate(VCycleInterpolate.Params(**params))


def test_the_merge_is_the_alpha_mix_of_base_and_decoalesced_small_model():
    base = large().state_dict()
    small = coalesce_llama(build_model("nano", vocab_size=64, max_seq_len=32, seed=1), width_factor=2,
                           depth_factor=2).state_dict()
    up = decoalesce_state_dict(small, base)
    merged = interpolate(alpha=0.25).merge(base, [small], ["coalesced"])
    assert merged.keys() == base.keys()
    for key, value in base.items():
        torch.testing.assert_close(merged[key], 0.75 * value + 0.25 * up[key], msg=key)
    assert all(torch.equal(interpolate(alpha=1.0).merge(base, [small], ["c"])[k], up[k]) for k in base)
    assert not torch.equal(merged["lm_head.weight"], base["lm_head.weight"])


def test_inputs_it_cannot_combine_are_refused_by_name():
    base, small = large().state_dict(), coalesce_llama(large(), width_factor=2, depth_factor=1).state_dict()
    with pytest.raises(MergeError, match=r"interpolates one coalesced model into the base; got 2: \['a', 'b'\]"):
        interpolate().merge(base, [small, small], ["a", "b"])
    with pytest.raises(MergeError, match="needs the large model from before coalescing as `base`"):
        interpolate().merge(None, [small], ["a"])
    with pytest.raises(MergeError, match="cannot de-coalesce 'a' into the base's shapes: de-coalescing needs the "
                                         "larger model's hidden width to be a whole multiple"):
        interpolate().merge(small, [base], ["a"])
    with pytest.raises(MergeError, match="takes alpha, not weights"):
        interpolate(weights=[1.0]).merge(base, [small], ["a"])
    for alpha in (0.0, 1.5):
        with pytest.raises(ValidationError, match="alpha"):
            interpolate(alpha=alpha)


def test_registered_with_its_paper_and_shaped_like_its_base():
    assert MERGERS.get("vcycle_interpolate") is VCycleInterpolate
    assert VCycleInterpolate.paper.arxiv == "2404.07999" and VCycleInterpolate.shaped_like_base
