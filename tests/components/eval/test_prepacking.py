"""Prepacking: packed prefill and decoding give each prompt exactly what its own forward gives."""
from __future__ import annotations

import random

import pytest
import torch

from components.eval.prepacking import (
    PrepackingError, first_fit_decreasing, prepacked_greedy_generate, prepacked_next_token_logits, supports_prepacking,
)
from components.model.presets import build_model

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return build_model("nano", vocab_size=VOCAB, max_seq_len=64, seed=0).eval()


def random_prompts(n: int, seed: int, shortest: int = 1, longest: int = 19) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(shortest, longest))] for _ in range(n)]


def unpacked_greedy(model, prompt: list[int], budget: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(budget):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_first_fit_decreasing_places_every_prompt_once_within_capacity():
    lengths = [3, 8, 5, 8, 1, 2, 7]
    bins = first_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    # longest first, each into the first bin with room: 8 | 8 | 7+1 | 5+3 | 2
    assert bins == [[1], [3], [6, 4], [2, 0], [5]]
    with pytest.raises(PrepackingError, match="prompt 1 has 8 tokens, more than the bin capacity 7"):
        first_fit_decreasing(lengths, 7)
    with pytest.raises(PrepackingError, match="prompt 1 is empty"):
        first_fit_decreasing([2, 0], 4)
    with pytest.raises(PrepackingError, match="capacity must be >= 1"):
        first_fit_decreasing([1], 0)


@pytest.mark.parametrize("bin_size", [None, 40])
def test_packed_prefill_logits_match_each_prompts_own_forward(model, bin_size):
    prompts = random_prompts(13, seed=1)
    packed, stats = prepacked_next_token_logits(model, prompts, bin_size=bin_size, rows_per_batch=3)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert max(stats.rows) > 1  # some rows really hold several prompts
    assert stats.prompt_tokens == sum(map(len, prompts))
    # a padded batch of the same prompts would hold 13 * 19 slots; packing fills rows
    assert stats.prefill_slots < len(prompts) * max(map(len, prompts))


def test_packed_greedy_generation_equals_one_prompt_at_a_time(model):
    prompts = random_prompts(17, seed=2)
    budgets = [random.Random(i).randint(1, 7) for i in range(len(prompts))]
    generated, stats = prepacked_greedy_generate(model, prompts, budgets, bin_size=30, rows_per_batch=4)
    assert generated == [unpacked_greedy(model, p, b) for p, b in zip(prompts, budgets)]
    assert max(stats.rows) > 1
    assert stats.decode_tokens == sum(budgets) - len(prompts)  # the first token of each comes from prefill
    assert stats.decode_slots >= stats.decode_tokens


def test_generation_stops_at_eos_and_at_a_stop_rule_keeping_the_trigger(model):
    prompts = random_prompts(9, seed=3)
    free = [unpacked_greedy(model, p, 6) for p in prompts]
    eos = free[0][2]  # a token the first prompt generates third
    generated, _ = prepacked_greedy_generate(model, prompts, 6, eos_token_id=[eos], rows_per_batch=2)
    for got, full in zip(generated, free):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert got == expected
    stop_after_two = prepacked_greedy_generate(model, prompts, 6, should_stop=lambda i, new: len(new) >= 2 + i % 2)[0]
    assert stop_after_two == [full[:2 + i % 2] for i, full in enumerate(free)]


def test_stats_count_no_padding_when_prompts_fill_their_rows(model):
    prompts = [[1] * 8, [2] * 8, [3] * 5, [4] * 3]
    _, stats = prepacked_next_token_logits(model, prompts, rows_per_batch=3)
    assert stats.rows == [1, 1, 2] and stats.forwards == 1 and stats.prefill_pad == 0
    _, stats = prepacked_greedy_generate(model, prompts, [1, 1, 3, 1], rows_per_batch=3)
    # two decode steps; each computes 3 rows x 2 slots, and only the third prompt's tokens are read
    assert stats.forwards == 3 and stats.decode_tokens == 2 and stats.decode_pad == 2 * 6 - 2


def test_bad_input_is_named(model):
    with pytest.raises(PrepackingError, match="no prompts"):
        prepacked_greedy_generate(model, [], 3)
    with pytest.raises(PrepackingError, match=r"one per prompt \(2\), got \[1\]"):
        prepacked_greedy_generate(model, [[1], [2]], [1])
    with pytest.raises(PrepackingError, match="max_new_tokens must be"):
        prepacked_greedy_generate(model, [[1]], 0)
    with pytest.raises(PrepackingError, match="rows_per_batch must be >= 1"):
        prepacked_greedy_generate(model, [[1]], 1, rows_per_batch=0)
    with pytest.raises(PrepackingError, match="more than the bin capacity 2"):
        prepacked_next_token_logits(model, [[1, 2, 3]], bin_size=2)


def test_a_model_that_cannot_be_packed_is_refused_by_name(model):
    from components.distill.eft import EftModel

    eft = EftModel(model, model, model, beta=0.5)
    assert not supports_prepacking(eft) and supports_prepacking(model)
    with pytest.raises(PrepackingError, match="needs a transformers model .*got EftModel"):
        prepacked_greedy_generate(eft, [[1, 2]], 2)
