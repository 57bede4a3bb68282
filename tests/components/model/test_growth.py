"""Growth and coalescing: FPI widening keeps the function exactly, AKI and depth growth copy the
weights they say they copy, coalescing a cyclic growth gives the small model back, and every
shape the operators cannot handle is refused by name."""
from __future__ import annotations

import re

import pytest
import torch

from components.model.growth import (LlamaSizes, coalesce_llama, decoalesce_state_dict, grow_llama, layer_map,
                                      width_maps)
from components.model.presets import build_model

VOCAB, SEQ = 64, 16
WIDER = dict(hidden_size=128, num_attention_heads=4, intermediate_size=320)  # head_dim 32, as nano's


def perturbed_nano(**config_overrides):
    """nano with every weight (norms included) moved off its initialisation, so that copying
    a norm weight or a column to the wrong place shows in the logits."""
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))


def test_fpi_width_growth_keeps_the_logits():
    small = perturbed_nano()
    grown = grow_llama(small, **WIDER, num_hidden_layers=2, init="fpi").eval()
    assert grown.config.hidden_size == 128 and grown.config.intermediate_size == 320
    assert sum(p.numel() for p in grown.parameters()) > 3 * sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        expected, actual = small(tokens()).logits, grown(tokens()).logits
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_the_small_model_is_left_unchanged():
    small = perturbed_nano()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    grow_llama(small, **WIDER, num_hidden_layers=3, init="aki")
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())


def test_aki_takes_the_new_units_incoming_weights_from_the_layer_above():
    small = perturbed_nano()
    fpi = grow_llama(small, **WIDER, num_hidden_layers=2, init="fpi", generator=torch.Generator().manual_seed(5))
    aki = grow_llama(small, **WIDER, num_hidden_layers=2, init="aki", generator=torch.Generator().manual_seed(5))
    up_small = [small.model.layers[i].mlp.up_proj.weight for i in (0, 1)]
    up_fpi, up_aki = fpi.model.layers[0].mlp.up_proj.weight, aki.model.layers[0].mlp.up_proj.weight
    # the old units keep layer 0's rows; the new ones hold layer 1's rows where FPI copies layer 0's
    torch.testing.assert_close(up_aki[:192, :64], up_small[0] / 2)  # every hidden unit has 2 copies
    assert torch.equal(up_aki[:192], up_fpi[:192]) and not torch.equal(up_aki[192:], up_fpi[192:])
    rows_from_layer_1 = (up_small[1] / 2)
    assert all(any(torch.allclose(row[:64], r) for r in rows_from_layer_1) for row in up_aki[192:])
    # the top layer has no layer above: AKI falls back to its own weights, as FPI
    top_fpi, top_aki = fpi.model.layers[1].state_dict(), aki.model.layers[1].state_dict()
    assert all(torch.equal(top_fpi[k], top_aki[k]) for k in top_fpi)
    with torch.no_grad():
        assert not torch.allclose(aki(tokens()).logits, small(tokens()).logits, atol=1e-3)


@pytest.mark.parametrize(("depth", "expected"), [("stack", [0, 1, 0, 1, 0]), ("interpolate", [0, 0, 0, 1, 1])])
def test_depth_growth_copies_whole_wide_layers(depth, expected):
    assert layer_map(2, 5, depth) == expected
    small = perturbed_nano()
    wide = grow_llama(small, **WIDER, num_hidden_layers=2, generator=torch.Generator().manual_seed(3))
    deep = grow_llama(small, **WIDER, num_hidden_layers=5, depth=depth, generator=torch.Generator().manual_seed(3))
    for new, source in enumerate(expected):
        a, b = deep.model.layers[new].state_dict(), wide.model.layers[source].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), (new, source)


@pytest.mark.parametrize(("sizes", "overrides", "message"), [
    (dict(hidden_size=32, num_attention_heads=1, intermediate_size=192), {}, "the target's hidden_size (32) is below the input's (64)"),
    (dict(hidden_size=128, num_attention_heads=4, intermediate_size=100), {},
     "the target's intermediate_size (100) is below the input's (192)"),
    (dict(hidden_size=96, num_attention_heads=3, intermediate_size=320), {}, "96 is not a multiple of 64"),
    (dict(hidden_size=128, num_attention_heads=2, intermediate_size=320), {}, "the input's 64/2 = 32, the target's 128/2 = 64"),
    (WIDER, {"tie_word_embeddings": True}, "lm_head is tied to its embedding"),
    (WIDER, {"num_key_value_heads": 1}, "shares 1 key/value heads among 2 query heads"),
    (WIDER, {"attention_bias": True}, "without biases"),
])
def test_shapes_growth_cannot_handle_are_refused_by_name(sizes, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        grow_llama(perturbed_nano(**overrides), **sizes, num_hidden_layers=2)


def test_a_model_that_is_not_llama_is_refused():
    with pytest.raises(ValueError, match="growth works on Llama models"):
        grow_llama(torch.nn.Linear(2, 2), **WIDER, num_hidden_layers=2)


def test_growth_leaves_the_global_random_stream_alone():
    small = perturbed_nano()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    grow_llama(small, **WIDER, num_hidden_layers=3, init="aki", generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)


def test_cyclic_maps_pair_unit_j_with_j_plus_n_and_whole_heads():
    narrow = LlamaSizes(64, 2, 192, 2, head_dim=32)
    wide = LlamaSizes(128, 4, 384, 4, head_dim=32)
    maps = width_maps(narrow, wide, "cyclic")
    assert maps.maps["hidden"].tolist() == [j % 64 for j in range(128)]
    heads = maps.maps["attention"].view(4, 32) // 32  # the narrow head of each wide head's rows
    assert heads[:, 0].tolist() == [0, 1, 0, 1] and bool((heads == heads[:, :1]).all())
    assert maps.counts("mlp").tolist() == [2.0] * 192


@pytest.mark.parametrize("depth", ["interpolate", "stack"])
def test_coalescing_a_cyclic_growth_gives_the_small_model_back(depth):
    small = perturbed_nano()
    grown = grow_llama(small, hidden_size=128, num_attention_heads=4, intermediate_size=384, num_hidden_layers=4,
                       extras="cyclic", depth=depth)
    back = coalesce_llama(grown, width_factor=2, depth_factor=2, depth=depth)
    assert back.config.hidden_size == 64 and back.config.num_hidden_layers == 2
    expected = small.state_dict()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-6, msg=key)
    # and through state dicts, as the V-cycle's merge de-coalesces
    decoalesced = decoalesce_state_dict(small.state_dict(), grown.state_dict(), depth)
    assert all(torch.equal(decoalesced[k], v) for k, v in grown.state_dict().items())


def test_coalescing_averages_rows_sums_columns_and_averages_adjacent_layers():
    large = perturbed_nano()
    small = coalesce_llama(large, width_factor=2, depth_factor=2)
    assert (small.config.hidden_size, small.config.num_attention_heads, small.config.intermediate_size,
            small.config.num_hidden_layers) == (32, 1, 96, 1)
    up = [large.model.layers[i].mlp.up_proj.weight.detach() for i in (0, 1)]
    # narrow unit u <- wide units u and u + 96 (rows: mean); narrow input c <- wide c and c + 32 (columns: sum)
    per_layer = [(w[:96] + w[96:]) / 2 for w in up]
    per_layer = [w[:, :32] + w[:, 32:] for w in per_layer]
    torch.testing.assert_close(small.model.layers[0].mlp.up_proj.weight, (per_layer[0] + per_layer[1]) / 2)
    embed = large.model.embed_tokens.weight.detach()
    torch.testing.assert_close(small.model.embed_tokens.weight, (embed[:, :32] + embed[:, 32:]) / 2)


@pytest.mark.parametrize(("factors", "message"), [
    (dict(width_factor=3, depth_factor=1), "coalescing by width_factor=3: hidden_size=64 is not divisible by it"),
    (dict(width_factor=1, depth_factor=3), "coalescing by depth_factor=3: num_hidden_layers=2 is not divisible"),
])
def test_coalescing_factors_that_do_not_divide_are_refused(factors, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        coalesce_llama(perturbed_nano(), **factors)


def test_decoalescing_into_shapes_that_are_not_multiples_is_refused():
    small = perturbed_nano().state_dict()
    odd = grow_llama(perturbed_nano(), **WIDER, num_hidden_layers=3).state_dict()  # MLP 320 = 192 + 128
    with pytest.raises(ValueError, match=re.escape("mlp width to be a whole multiple of the smaller model's; 320 is "
                                                   "not a multiple of 192")):
        decoalesce_state_dict(small, odd)
