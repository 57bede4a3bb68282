import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.got_d import GotD, c_transform, calibrated_gradients, pairwise_cost, solve_ot
from components.data.registry import SELECTORS
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.data.tokenizer import pack_documents
from components.model.presets import build_model

BAKING = "bake flour sugar oven butter dough knead recipe bread cake whisk egg milk salt".split()
ASTRONOMY = "star galaxy orbit planet telescope comet nebula moon solar gravity light year astronomer eclipse".split()
COMMON = "the a of and to is in it with for on that".split()


def _frame(texts, domains, prefix):
    n = len(texts)
    return pd.DataFrame({"id": [f"{prefix}-{i:04d}" for i in range(n)], "text": texts, "domain": domains,
                         "source": ["test"] * n, "split": ["train"] * n})


def _skewed(seed=0, n_a=380, n_b=20, n_target=20):
    """Pool 95% baking (A) + 5% astronomy (B); target 50/50 A/B."""
    rng = np.random.default_rng(seed)

    def doc(vocab):
        return " ".join(rng.choice(vocab + COMMON, size=int(rng.integers(15, 40))))

    pool = _frame([doc(BAKING) for _ in range(n_a)] + [doc(ASTRONOMY) for _ in range(n_b)],
                  ["A"] * n_a + ["B"] * n_b, "pool")
    target = _frame([doc(BAKING) for _ in range(n_target)] + [doc(ASTRONOMY) for _ in range(n_target)],
                    ["A"] * n_target + ["B"] * n_target, "target")
    return pool, target


def _top_fraction_b(scores, domains, k):
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(np.mean(np.asarray(domains)[top] == "B"))


def test_ot_gradient_picks_what_the_pool_lacks_while_nearest_to_target_does_not():
    # Two equally spread clusters: A is 95% of the pool, B 5%; the target is half A, half B.
    rng = np.random.default_rng(0)
    centre_a, centre_b = np.zeros(8), np.full(8, 3.0)
    pool = np.vstack([centre_a + rng.normal(size=(380, 8)), centre_b + rng.normal(size=(20, 8))])
    target = np.vstack([centre_a + rng.normal(size=(20, 8)), centre_b + rng.normal(size=(20, 8))])
    domains = np.array(["A"] * 380 + ["B"] * 20)
    cost = pairwise_cost(pool, target, "sqeuclidean")
    solution = solve_ot(cost)
    got_d = -calibrated_gradients(c_transform(cost, solution["v"], None))
    nearest = -cost.min(axis=1)
    assert _top_fraction_b(got_d, domains, 20) == 1.0  # every B candidate ranks above every A one
    assert _top_fraction_b(nearest, domains, 20) < 0.4  # matching the target alone mostly keeps A


def test_calibrated_gradient_is_the_directional_derivative_of_the_ot_distance():
    # Moving mass eps to candidate i evenly from the others changes OT by eps * g_i (generic masses:
    # the dual solution is unique, so the piecewise-linear OT value is differentiable there).
    rng = np.random.default_rng(1)
    cost = pairwise_cost(rng.normal(size=(12, 3)), rng.normal(size=(7, 3)), "sqeuclidean")
    a, b = rng.dirichlet(np.ones(12)), rng.dirichlet(np.ones(7))
    solution = solve_ot(cost, a=a, b=b)
    gradients = calibrated_gradients(solution["u"])
    eps = 1e-7
    for i in range(12):
        direction = np.full(12, -1.0 / 11)
        direction[i] = 1.0
        moved = solve_ot(cost, a=a + eps * direction, b=b)["distance"]
        assert (moved - solution["distance"]) / eps == pytest.approx(gradients[i], abs=1e-4)


def test_c_transform_reproduces_the_solved_duals_for_both_solvers():
    rng = np.random.default_rng(2)
    cost = pairwise_cost(rng.normal(size=(30, 4)), rng.normal(size=(10, 4)), "euclidean")
    exact = solve_ot(cost)
    assert np.ptp(c_transform(cost, exact["v"], None) - exact["u"]) < 1e-10  # equal up to a constant
    entropic = solve_ot(cost, "sinkhorn", reg=0.05 * cost.mean(), max_iter=5000)
    assert np.ptp(c_transform(cost, entropic["v"], entropic["reg"]) - entropic["u"]) < 1e-6
    assert entropic["distance"] >= exact["distance"] - 1e-12  # the entropic plan is feasible, so no cheaper


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_got_d_on_text_keeps_the_underrepresented_target_domain(solver):
    pool, target = _skewed()
    selector = GotD(GotD.Params(keep_fraction=0.05, solver=solver))
    selector.fit(SelectionContext(stage="test", seed=0, target=target, pool_sample=pool))
    scores = selector.scores(pool)
    assert _top_fraction_b(scores, pool["domain"], 20) >= 0.9  # top 5%: (nearly) all of B
    assert _top_fraction_b(scores, pool["domain"], 40) == 0.5  # top 10%: every B document
    assert selector.facts["ot_candidates"] == 400 and selector.facts["ot_targets"] == 40
    assert selector.facts["c_transform_gap"] < 1e-6
    assert selector.select(pool).sum() == 20


def test_got_d_scores_are_per_document_and_deterministic():
    pool, target = _skewed(seed=3)
    context = SelectionContext(stage="test", seed=0, target=target, pool_sample=pool.iloc[::2])
    first, second = GotD(GotD.Params(keep_fraction=0.1)), GotD(GotD.Params(keep_fraction=0.1))
    first.fit(context)
    second.fit(context)
    whole = first.scores(pool)
    np.testing.assert_array_equal(whole, second.scores(pool))
    # a document scores the same in any shard, so shards can be scored apart and in parallel
    reversed_shards = np.concatenate([first.scores(pool.iloc[200:]), first.scores(pool.iloc[:200])])
    np.testing.assert_allclose(np.concatenate([whole[200:], whole[:200]]), reversed_shards, atol=1e-12)
    # process-based shard runners (dask, ray) ship the fitted selector to workers
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(first)).scores(pool), whole)


def test_got_d_with_a_reference_model_embeds_with_its_hidden_states():
    pool, target = _skewed(n_a=95, n_b=5, n_target=10)
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=300, seq_len=64)).train(
        pool["text"].tolist() + target["text"].tolist())
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=64, seed=0)
    blocks = torch.from_numpy(pack_documents(tokenizer, pool["text"].tolist() + target["text"].tolist(), 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = np.random.default_rng(0)
    for _ in range(40):  # a model that has seen both vocabularies embeds them apart
        batch = blocks[batches.integers(len(blocks), size=8)].long()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    context = SelectionContext(stage="test", seed=0, target=target, pool_sample=pool, tokenizer=tokenizer,
                               references=[ReferenceModel("ref", model)])
    selector = GotD(GotD.Params(keep_fraction=0.05, max_tokens=48))
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    selector.fit(context)
    scores = selector.scores(pool)
    hook.remove()
    assert forwards  # the reference model embedded the documents, not the n-gram fallback
    assert scores.shape == (100,) and np.isfinite(scores).all()
    np.testing.assert_allclose(np.concatenate([selector.scores(pool.iloc[:37]), selector.scores(pool.iloc[37:])]),
                               scores, atol=1e-6)
    assert _top_fraction_b(scores, pool["domain"], 5) >= 0.8


def test_got_d_errors_name_what_is_missing():
    pool, target = _skewed(n_a=10, n_b=2, n_target=2)
    with pytest.raises(SelectionError, match="embedding='reference'"):
        GotD(GotD.Params(keep_fraction=0.1, embedding="reference")).fit(
            SelectionContext(stage="test", seed=0, target=target, pool_sample=pool))
    with pytest.raises(SelectionError, match="target"):
        GotD(GotD.Params(keep_fraction=0.1)).fit(SelectionContext(stage="test", seed=0, pool_sample=pool))
    with pytest.raises(ValueError, match="solver"):
        GotD.Params(keep_fraction=0.1, solver="lp")
    assert SELECTORS.get("got_d") is GotD
