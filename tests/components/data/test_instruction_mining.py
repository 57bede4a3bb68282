import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.instruction_mining import InstructionMining, fit_linear_rule, gumbel_top_k, mtld
from components.data.registry import SELECTORS
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.data.tokenizer import pack_documents
from components.model.presets import build_model

BAKING = "bake flour sugar oven butter dough knead recipe bread cake whisk egg milk salt".split()
ASTRONOMY = "star galaxy orbit planet telescope comet nebula moon solar gravity light year astronomer eclipse".split()
COMMON = "the a of and to is in it with for on that".split()
JUNK = list("qxzjkvw#@%0123456789")


def _frame(texts, domains, prefix):
    n = len(texts)
    return pd.DataFrame({"id": [f"{prefix}-{i:04d}" for i in range(n)], "text": texts, "domain": domains,
                         "source": ["test"] * n, "split": ["train"] * n})


@pytest.fixture(scope="module")
def setting():
    """Pool: a third baking (the target domain), a third astronomy, a third junk; a nano model
    trained briefly on the pool."""
    rng = np.random.default_rng(0)

    def doc(vocab):
        return " ".join(rng.choice(vocab + COMMON, size=int(rng.integers(15, 40))))

    def junk():
        return " ".join("".join(rng.choice(JUNK, size=int(rng.integers(2, 7)))) for _ in range(rng.integers(10, 30)))

    texts = [doc(BAKING) for _ in range(40)] + [doc(ASTRONOMY) for _ in range(40)] + [junk() for _ in range(40)]
    pool = _frame(texts, ["A"] * 40 + ["B"] * 40 + ["junk"] * 40, "pool")
    target = _frame([doc(BAKING) for _ in range(40)], ["A"] * 40, "target")
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=64)).train(
        texts + target["text"].tolist())
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=128, seed=0)
    blocks = torch.from_numpy(pack_documents(tokenizer, texts, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = np.random.default_rng(0)
    for _ in range(40):
        batch = blocks[batches.integers(len(blocks), size=8)].long()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    context = SelectionContext(stage="test", seed=0, target=target, pool_sample=pool, tokenizer=tokenizer,
                               references=[ReferenceModel("ref", model)])
    return pool, context


def test_ols_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    beta = np.array([0.5, -0.25, 0.0, 1.5])
    y = 1.2 + x @ beta + rng.normal(scale=1e-4, size=30)
    intercept, coef, r2 = fit_linear_rule(x, y)
    assert intercept == pytest.approx(1.2, abs=1e-3)
    np.testing.assert_allclose(coef, beta, atol=1e-3)
    assert r2 > 0.9999
    with pytest.raises(ValueError, match="indicators must be"):
        fit_linear_rule(x[:, 0], y)


def test_mtld_and_gumbel_top_k():
    assert mtld(["a"] * 10) == 2.0  # TTR falls to 0.5 at every 2nd word: 5 full factors in 10 words
    assert mtld("one two three four five".split()) == 5.0  # never falls to the threshold
    assert mtld([]) == 0.0
    assert mtld("the cat and the dog and the bird".split()) > mtld("the the the cat cat cat the cat".split())
    rng = np.random.default_rng(0)
    picks = gumbel_top_k(np.array([0.0, 0.0, 50.0, 50.0, 0.0]), 2, rng)
    assert picks.tolist() == [2, 3]  # overwhelming weights are always drawn, without replacement


def test_instruction_mining_end_to_end_is_finite_and_deterministic(setting):
    pool, context = setting
    params = InstructionMining.Params(
        keep_fraction=0.25, indicators=("reference_loss", "alpha_fraction"), n_subsets=6, holdout_fraction=0.5,
        subset_size=8, finetune_steps=2, finetune_batch_size=4, finetune_seq_len=32, eval_max_docs=4, max_tokens=32)
    first, second = InstructionMining(params), InstructionMining(params)
    first.fit(context)
    second.fit(context)
    scores = first.scores(pool)
    assert scores.shape == (len(pool),) and np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, second.scores(pool))
    np.testing.assert_allclose(np.concatenate([first.scores(pool.iloc[:50]), first.scores(pool.iloc[50:])]),
                               scores, atol=1e-5)  # fp32 forwards of differently padded batches
    assert set(first.facts) >= {"rule_spearman_heldout", "rule_spearman_heldout_shuffled", "rule_r2_insample", "rule_intercept",
                                "coef_reference_loss", "coef_alpha_fraction", "reference_target_loss"}
    assert all(np.isfinite(v) for v in first.facts.values())
    assert first.facts == second.facts
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(first)).scores(pool), scores)  # dask/ray shard runners


def test_instruction_mining_rule_keeps_target_like_documents(setting):
    pool, context = setting
    selector = InstructionMining(InstructionMining.Params(
        keep_fraction=1 / 3, indicators=("knn_target_distance", "reference_loss", "alpha_fraction"), n_subsets=16,
        subset_size=24, finetune_steps=10, finetune_seq_len=32, eval_max_docs=12, max_tokens=48))
    selector.fit(context)
    kept = pool["domain"][selector.select(pool)]
    assert len(kept) == 40
    assert (kept == "A").mean() >= 0.65  # the pool is one third target-domain documents
    assert selector.facts["coef_knn_target_distance"] > 0  # data far from the target raises its loss
    assert selector.facts["measured_loss_min"] < selector.facts["measured_loss_max"]


def test_instruction_mining_bad_params_name_the_params(setting):
    pool, context = setting
    with pytest.raises(SelectionError, match="subset_size=500.*fit_sample_docs"):
        InstructionMining(InstructionMining.Params(keep_fraction=0.5, subset_size=500)).fit(context)
    with pytest.raises(ValidationError, match="n_subsets=4"):
        InstructionMining.Params(keep_fraction=0.5, n_subsets=4)
    with pytest.raises(ValidationError, match="must not repeat"):
        InstructionMining.Params(keep_fraction=0.5, indicators=("mtld", "mtld"))
    with pytest.raises(ValidationError, match="indicators"):
        InstructionMining.Params(keep_fraction=0.5, indicators=("reward_model",))
    no_reference = SelectionContext(stage="test", seed=0, target=context.target, pool_sample=pool,
                                    tokenizer=context.tokenizer)
    with pytest.raises(SelectionError, match="reference"):
        InstructionMining(InstructionMining.Params(keep_fraction=0.5)).fit(no_reference)
    too_long = InstructionMining.Params(keep_fraction=0.5, finetune_seq_len=512)
    with pytest.raises(SelectionError, match="finetune_seq_len=512"):
        InstructionMining(too_long).fit(context)
    assert SELECTORS.get("instruction_mining") is InstructionMining
    assert InstructionMining.needs_target and InstructionMining.needs_tokenizer
    assert InstructionMining.min_references == 1
