"""Self-sampled partial solutions: steps verified against the computation, the buffer keeps only
verified steps, the buffer batch scores only them, sampling is seeded, resume is exact."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from components.data.arithmetic_formats import (  # noqa: E402
    FORMATS, format_completion, format_prompt, solution_steps, unique_problems, verified_prefix,
)
from components.eval.arithmetic_eval import generate_answers  # noqa: E402
from components.model.presets import build_model  # noqa: E402
from components.train import self_sampled as module  # noqa: E402
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS  # noqa: E402
from components.train.self_sampled import SelfSampledError, SelfSampledSolutions  # noqa: E402
from components.train.trainer import train  # noqa: E402
from tests.components.train.test_masked_thought import SEQ, TOKENIZER, corpus  # noqa: E402


def method(**params) -> SelfSampledSolutions:
    m = SelfSampledSolutions(SelfSampledSolutions.Params(**params))
    m.use_tokenizer(TOKENIZER)
    return m


def nano():
    return build_model("nano", vocab_size=len(TOKENIZER), max_seq_len=SEQ, seed=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_steps_join_to_the_solution_and_only_correct_leading_steps_count(fmt):
    for a, b in [(0, 0), (57, 68), (999, 1), (5, 305)]:
        steps = solution_steps(fmt, a, b)
        solution = "".join(steps)
        assert solution == format_completion(fmt, a, b)
        assert verified_prefix(fmt, a, b, solution) == (len(steps), True)
        assert verified_prefix(fmt, a, b, solution + "\nInput:") == (len(steps), True)
        assert verified_prefix(fmt, a, b, solution + "7") == (len(steps) - 1, False)  # a wrong final answer
        assert verified_prefix(fmt, a, b, "x" + solution) == (0, False)
        for k in range(len(steps) - 1):  # a wrong character inside step k keeps exactly the steps before it
            wrong = "".join(steps[:k]) + ("#" + steps[k][1:])
            assert verified_prefix(fmt, a, b, wrong) == (k, False)


def test_scratchpad_steps_are_lines_and_reversed_steps_are_digits():
    assert solution_steps("scratchpad_simple", 57, 68) == ["A->5 , C->1\n", "A->2 , C->1.\n", "125"]
    assert solution_steps("reversed", 57, 68) == ["5", "2", "1", "$"]
    assert solution_steps("plain", 57, 68) == ["125"]  # its first digit needs every carry: one step
    assert verified_prefix("scratchpad_simple", 57, 68, "A->5 , C->1\nA->3 , C->1.\n135") == (1, False)


def test_problems_are_the_prompts_found_whole_in_the_training_blocks():
    blocks, _ = corpus("scratchpad_simple", n_docs=40)
    m = method()
    m.use_blocks(blocks.numpy())
    texts = [TOKENIZER.decode(row.tolist(), skip_special_tokens=False) for row in blocks]
    problems = unique_problems(np.random.default_rng(0), 80, 3)
    expected = {(int(a), int(b)) for a, b in problems
                if any(format_prompt("scratchpad_simple", a, b) in t[1:] for t in texts)}
    assert set(m._problems) == expected and len(expected) > 40
    with pytest.raises(SelfSampledError, match=f"no reversed prompts in the {len(blocks)} training blocks"):
        method(format="reversed").use_blocks(blocks.numpy())


def test_the_buffer_keeps_verified_steps_and_its_batch_scores_only_them(monkeypatch):
    blocks, _ = corpus("scratchpad_simple", n_docs=40)
    m = method(problems_per_round=3, buffer_batch=16)
    m.use_blocks(blocks.numpy())
    drawn = []

    def fake_generate(model, tokenizer, fmt, problems, **kwargs):  # one complete, one partial, one wrong
        drawn.extend(problems)
        completions = ["".join(solution_steps(fmt, *problems[0])), solution_steps(fmt, *problems[1])[0] + "A->#",
                       "garbage"]
        return [format_prompt(fmt, a, b) + c for (a, b), c in zip(problems, completions)]

    monkeypatch.setattr(module, "generate_answers", fake_generate)
    m.sampling_round(nano(), step=1)
    first, second, third = drawn
    assert m._buffer == {first: len(solution_steps("scratchpad_simple", *first)), second: 1}
    ids, mask, labels = m.buffer_batch(step=5, device=torch.device("cpu"))
    assert ids.shape == labels.shape == (16, m._width)
    for row in range(16):
        scored = TOKENIZER.decode(labels[row][labels[row] != -100].tolist(), skip_special_tokens=False)
        text = TOKENIZER.decode(ids[row][mask[row] == 1].tolist(), skip_special_tokens=False)
        prompt, rest = text[len("</s>"):].split("Target:\n", 1)
        a, b = (int(x) for x in prompt.removeprefix("Input:\n").strip().split("+"))
        assert scored == rest and (a, b) in (first, second)  # the prompt is context, never scored
        steps = solution_steps("scratchpad_simple", a, b)
        assert rest == ("".join(steps) + "</s>" if (a, b) == first else steps[0])

    partial_off = method(problems_per_round=3, partial=False)
    partial_off.use_blocks(blocks.numpy())
    drawn.clear()
    partial_off.sampling_round(nano(), step=1)
    assert list(partial_off._buffer) == [drawn[0]]  # complete solutions only


def test_gold_control_adds_whole_solutions_without_sampling(monkeypatch):
    blocks, _ = corpus("scratchpad_simple", n_docs=40)
    m = method(targets_from="gold", problems_per_round=5)
    m.use_blocks(blocks.numpy())
    monkeypatch.setattr(module, "generate_answers", lambda *a, **k: pytest.fail("the gold control samples"))
    m.sampling_round(nano(), step=3)
    assert len(m._buffer) == 5
    assert all(steps == len(solution_steps("scratchpad_simple", a, b)) for (a, b), steps in m._buffer.items())


def test_sampling_is_seeded_and_leaves_the_global_generator_alone():
    model = nano()
    problems = [(12, 34), (5, 678), (90, 9)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_answers(model, TOKENIZER, "reversed", problems, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == generate_answers(model, TOKENIZER, "reversed", problems, temperature=1.0, seed=7)
    assert first != generate_answers(model, TOKENIZER, "reversed", problems, temperature=1.0, seed=8)
    greedy = generate_answers(model, TOKENIZER, "reversed", problems)
    assert greedy == generate_answers(model, TOKENIZER, "reversed", problems, seed=9)  # no temperature: greedy


def test_training_samples_resumes_bit_exactly_and_reports_the_extra_work(tmp_path):
    blocks = corpus("reversed", n_docs=100)[0].numpy().astype(np.int32)
    config = SelfSampledSolutions.Params(format="reversed", steps=8, batch_size=8, lr=1e-2, warmup_steps=2,
                                         precision="fp32", checkpoint_every=4, problems_per_round=32,
                                         sample_every=2, temperature=1.0)

    def run(**kwargs):
        model = nano()
        return model, train(model, blocks, config, method(**config.model_dump()), progress=False, **kwargs)

    straight_model, straight = run()
    run(checkpoint_dir=tmp_path, stop_after_step=4)
    resumed_model, resumed = run(checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 4 and resumed.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), resumed_model.parameters()))
    facts = straight.method_facts["self_sampled"]
    assert resumed.method_facts["self_sampled"] == facts
    assert facts["samples"] == 4 * 32  # rounds at steps 1, 3, 5, 7
    assert facts["generated_tokens"] > 0 and facts["training_problems"] > 100
    # even an untrained model writes some right first digits: the buffer fills and is trained on,
    # and the resumed run restored it (its losses above include the buffer loss)
    assert 0 < facts["buffer_problems"] <= facts["samples_complete"] + facts["samples_partial"]
    assert facts["buffer_tokens_trained"] > 0


def test_refusals_and_registries():
    with pytest.raises(SelfSampledError, match="use_tokenizer"):
        SelfSampledSolutions().use_blocks(np.zeros((1, 8), dtype=np.int32))
    with pytest.raises(SelfSampledError, match="use_blocks"):
        method().bind(nano(), None, 1)
    with pytest.raises(ValueError, match="temperature"):
        SelfSampledSolutions.Params(temperature=0)
    with pytest.raises(ValueError, match="format"):
        SelfSampledSolutions.Params(format="hex")
    with pytest.raises(SelfSampledError, match="expected"):
        method().load_state_tensors({"other": torch.zeros(1)})
    assert PRETRAIN_METHODS.get("self_sampled") is SelfSampledSolutions
    assert FINETUNE_METHODS.get("self_sampled").paper.arxiv == "2205.14318"
