"""Arithmetic exact match: scoring on strings, held-out problems, and an end-to-end run on a nano model."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from components.data.arithmetic_formats import FORMATS, format_example, format_prompt
from components.data.byte_bpe import ByteBpeTokenizer
from components.data.standard_corpus import StandardCorpus
from components.data.tokenizer import pack_documents
from components.distill.eft import EftModel
from components.eval.arithmetic_eval import (
    ArithmeticEvalError, ArithmeticExactMatch, evenly_spaced, exact_match, generate_answers, heldout_problems,
)
from components.eval.evaluators import EVALUATORS
from components.eval.standard import perplexity_metrics
from components.model.presets import build_model
from tasks.evaluate import _extra_inputs, prefixed_fact_metrics

NO_NOISE = {"boilerplate": 0, "gibberish": 0, "exact_duplicate": 0, "near_duplicate": 0, "spam": 0}
PROBLEMS = [(128, 367), (999, 1), (0, 0), (5, 97), (4321, 8765), (50, 50)]


def corpus(fmt: str, n_docs: int = 300, per_doc: int = 1) -> pd.DataFrame:
    params = StandardCorpus.Params(
        sources=[{"type": "arithmetic_formatted", "format": fmt, "n_docs": n_docs, "examples_per_doc": per_doc,
                  "max_digits": 3}],
        noise=NO_NOISE, split={"validation": 0.1, "test": 0.1}, seed=1)
    return StandardCorpus(params).build()


@pytest.mark.parametrize("fmt", FORMATS)
def test_oracle_texts_score_one_and_wrong_answers_score_zero(fmt):
    oracle = [format_example(fmt, a, b) for a, b in PROBLEMS]
    assert exact_match(fmt, PROBLEMS, oracle) == {"exact_match": 1.0, "parsed": 1.0}
    # the answer of another problem, a bare prompt (no generation) and junk after the prompt
    shifted = [format_example(fmt, a, b + 1) for a, b in PROBLEMS[:2]]
    texts = shifted + [format_prompt(fmt, *PROBLEMS[2]), format_prompt(fmt, *PROBLEMS[3]) + "xyz"] + oracle[4:]
    score = exact_match(fmt, PROBLEMS, texts)
    assert score == {"exact_match": pytest.approx(2 / 6), "parsed": pytest.approx(4 / 6)}
    with pytest.raises(ArithmeticEvalError, match="6 problems but 1 generated"):
        exact_match(fmt, PROBLEMS, oracle[:1])


def test_heldout_problems_detect_the_format_and_follow_table_order():
    docs = corpus("scratchpad_simple", per_doc=2)
    heldout = docs[docs["split"] != "train"]
    fmt, problems = heldout_problems(heldout, "arithmetic", "test")
    assert fmt == "scratchpad_simple" and len(problems) == 2 * 30
    first = heldout[heldout["split"] == "test"]["text"].iloc[0]
    assert first.startswith(format_example(fmt, *problems[0]) + "\n" + format_example(fmt, *problems[1]))
    assert heldout_problems(heldout, "arithmetic", "test", limit=7)[1] == problems[:7]
    with pytest.raises(ArithmeticEvalError, match="no held-out 'test' documents in domain 'prose'"):
        heldout_problems(heldout, "prose", "test")
    with pytest.raises(ArithmeticEvalError, match="held-out document .*not a well-formed scratchpad_detailed"):
        heldout_problems(heldout, "arithmetic", "test", fmt="scratchpad_detailed")
    mixed = heldout.copy()
    mixed.loc[mixed.index[mixed["split"] == "test"][0], "text"] = "12+3=15"
    with pytest.raises(ArithmeticEvalError, match="cannot tell the arithmetic format"):
        heldout_problems(mixed, "arithmetic", "test")


def test_evenly_spaced_is_deterministic_and_capped():
    assert evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4]
    picked = evenly_spaced(1000, 8)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 999 and (np.diff(picked) > 100).all()


@pytest.fixture(scope="module")
def nano_setup():
    docs = corpus("reversed", n_docs=400, per_doc=2)
    train_docs = docs[docs["split"] == "train"]["text"].tolist()
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=300, seq_len=32)).train(train_docs)
    test = pack_documents(tokenizer, docs[docs["split"] == "test"]["text"].tolist(), 32)
    train = pack_documents(tokenizer, train_docs, 32)
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=64, seed=0)
    return model, tokenizer, docs[docs["split"] != "train"], {"arithmetic": test}, {"arithmetic": train}


def test_end_to_end_on_a_nano_model(nano_setup, tmp_path):
    model, tokenizer, heldout, test_blocks, train_blocks = nano_setup
    evaluator = EVALUATORS.get("arithmetic_exact_match")(
        ArithmeticExactMatch.Params(limit=12, max_train_blocks=16, max_blocks_per_domain=8))
    m = evaluator.evaluate(model, tokenizer, None, test_blocks, [], tmp_path, train_blocks=train_blocks,
                           heldout=heldout)
    assert m["arith_n"] == 12 and 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["arith_parsed"] <= 1.0
    for key in ("loss_arithmetic", "ppl_arithmetic", "loss_all", "loss_domain_mean", "loss_train", "loss_heldout"):
        assert math.isfinite(m[key]) and m[key] > 0, key
    assert m["loss_heldout"] == m["loss_arithmetic"]
    assert m["loss_gap"] == pytest.approx(m["loss_heldout"] - m["loss_train"])
    with pytest.raises(ArithmeticEvalError, match="needs the held-out documents"):
        evaluator.evaluate(model, tokenizer, None, test_blocks, [], tmp_path)


@pytest.mark.parametrize("batching", ["by_length", "prepacked"])
def test_batched_generation_equals_one_at_a_time(nano_setup, batching):
    model, tokenizer, _, _, _ = nano_setup
    problems = [(12, 7), (3, 4), (120, 77), (1, 2), (45, 300), (7, 8)]
    batched = generate_answers(model, tokenizer, "reversed", problems, batch_size=8, batching=batching)
    single = [generate_answers(model, tokenizer, "reversed", [p], batch_size=1)[0] for p in problems]
    # by_length: one prompt length per batch (no padding); prepacked: a block-diagonal mask per
    # row; either way a budget per problem
    assert batched == single
    assert all(t.startswith(format_prompt("reversed", a, b)) for t, (a, b) in zip(batched, problems))
    if batching == "prepacked":  # a wrapper that cannot be packed (EFT's) is generated by_length instead
        eft = EftModel(model, model, model, beta=0.5)
        assert (generate_answers(eft, tokenizer, "reversed", problems[:3], batching="prepacked")
                == generate_answers(eft, tokenizer, "reversed", problems[:3], batching="by_length"))
    with pytest.raises(ArithmeticEvalError, match=r"scratchpad_detailed example .* takes \d+ tokens .* context is 64"):
        generate_answers(model, tokenizer, "scratchpad_detailed", problems)


def test_perplexity_metrics_add_the_unweighted_domain_mean(nano_setup):
    model, _, _, test_blocks, train_blocks = nano_setup
    blocks = {"a": test_blocks["arithmetic"][:2], "b": train_blocks["arithmetic"][:6]}
    m = perplexity_metrics(model, blocks, batch_size=4, max_blocks_per_domain=8)
    assert m["loss_domain_mean"] == pytest.approx((m["loss_a"] + m["loss_b"]) / 2)
    assert m["loss_all"] == pytest.approx((2 * m["loss_a"] + 6 * m["loss_b"]) / 8)  # token-weighted


def test_evaluate_task_passes_what_an_evaluator_asks_for(tmp_path):
    np.save(tmp_path / "train-arithmetic.npy", np.zeros((3, 4), np.int32))
    np.save(tmp_path / "train.npy", np.zeros((3, 4), np.int32))
    heldout = pd.DataFrame({"text": ["1+2=3"]})
    extra = _extra_inputs(ArithmeticExactMatch(), tmp_path, heldout)
    assert set(extra["train_blocks"]) == {"arithmetic"} and extra["heldout"] is heldout
    assert _extra_inputs(EVALUATORS.get("standard")(), tmp_path, heldout) == {}
    facts = {"sampler_epochs": 3, "sampler_weight_a": 0.25, "sampler_name": "rs2", "sampler_flag": True,
             "steps": 10, "method": "dense"}
    assert prefixed_fact_metrics(facts) == {"sampler_epochs": 3, "sampler_weight_a": 0.25}
