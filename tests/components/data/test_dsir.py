import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from components.data.dsir import DSIR, EPS, SHORT_PENALTY, gumbel_noise
from components.data.hashed_ngrams import hashed_ngram_counts
from components.data.selector import SelectionContext, SelectionError

SHARED = "the a of and to in is it that for on with as this be at by".split()
PROSE = ("river mountain quiet morning garden letter window friend story summer evening village "
         "forest journey music winter painting harbor lantern meadow").split()
CODE = ("def return class self import lambda yield none true false tuple dict list append "
        "range len print raise except assert").split()


def _doc(rng, vocab, n_words):
    # half the words from a vocabulary both domains share, so the domains overlap
    shared = rng.random(n_words) < 0.5
    picks = np.where(shared, rng.integers(len(SHARED), size=n_words), rng.integers(len(vocab), size=n_words))
    return " ".join(SHARED[p] if s else vocab[p] for s, p in zip(shared, picks))


def _docs(n_prose, n_code, seed, split="train", n_words=(110, 160), start=0):
    rng = np.random.default_rng(seed)
    domains = ["prose"] * n_prose + ["code"] * n_code
    rng.shuffle(domains)
    texts = [_doc(rng, PROSE if d == "prose" else CODE, int(rng.integers(*n_words))) for d in domains]
    n = len(texts)
    return pd.DataFrame({"id": [f"{split}-{i + start:05d}" for i in range(n)], "text": texts, "domain": domains,
                         "source": ["synthetic"] * n, "split": [split] * n})


@pytest.fixture(scope="module")
def pool():
    return _docs(n_prose=100, n_code=900, seed=1)  # target domain = 10% of the pool


@pytest.fixture(scope="module")
def target():
    return _docs(n_prose=30, n_code=0, seed=2, split="validation")


def _fitted(pool, target, **params):
    selector = DSIR(DSIR.Params(keep_fraction=0.1, **params))
    selector.fit(SelectionContext(stage="select_dsir", seed=0, target=target, pool_sample=pool))
    return selector


@pytest.mark.parametrize("top_k", [False, True])
def test_selects_the_target_domain(pool, target, top_k):
    selector = _fitted(pool, target, top_k=top_k)
    keep = selector.select(pool)
    assert keep.sum() == 100
    fraction = (pool["domain"][keep] == "prose").mean()
    assert (pool["domain"] == "prose").mean() == pytest.approx(0.1)
    assert fraction > 0.8, fraction
    assert selector.facts["kl_target_raw"] > 0.5  # the target is far from the pool
    assert selector.facts["fit_pool_docs"] == 1000 and selector.facts["target_ngrams"] > 30 * 200


def test_log_weights_follow_the_reference_formula(pool, target):
    selector = _fitted(pool, target, num_buckets=64, top_k=True, min_example_length=0)
    raw = np.asarray(hashed_ngram_counts(pool["text"], 64, dtype=np.float64).sum(axis=0)).ravel()
    tgt = np.asarray(hashed_ngram_counts(target["text"], 64, dtype=np.float64).sum(axis=0)).ravel()
    log_diff = np.log(tgt / tgt.sum() + EPS) - np.log(raw / raw.sum() + EPS)
    np.testing.assert_allclose(selector.log_diff, log_diff)
    docs = pool.head(5)
    expected = hashed_ngram_counts(docs["text"], 64, dtype=np.float64).toarray() @ log_diff
    np.testing.assert_allclose(selector.scores(docs), expected)  # not length-normalised
    p = tgt / tgt.sum()
    assert selector.facts["kl_target_raw"] == pytest.approx(float(np.sum(p[p > 0] * log_diff[p > 0])))
    # Laplace smoothing of the target counts
    smoothed = _fitted(pool, target, num_buckets=64, target_laplace_smoothing=2.0)
    p_smooth = (tgt + 2.0) / (tgt + 2.0).sum()
    np.testing.assert_allclose(smoothed.log_diff, np.log(p_smooth + EPS) - np.log(raw / raw.sum() + EPS))


def test_unigram_only_features(pool, target):
    selector = _fitted(pool, target, ngrams=1, top_k=True)
    weights, words = selector.log_weights(pool.head(3))
    assert words.tolist() == [len(t.split()) for t in pool["text"].head(3)]
    assert (pool["domain"][selector.select(pool)] == "prose").mean() > 0.8


def test_deterministic_and_seeded(pool, target):
    a = _fitted(pool, target, seed=3).scores(pool)
    np.testing.assert_array_equal(a, _fitted(pool, target, seed=3).scores(pool))
    b = _fitted(pool, target, seed=4).scores(pool)
    assert not np.allclose(a, b)
    # top_k has no noise: the seed does not matter
    np.testing.assert_array_equal(_fitted(pool, target, top_k=True, seed=3).scores(pool),
                                  _fitted(pool, target, top_k=True, seed=4).scores(pool))


def test_scores_do_not_depend_on_shards(pool, target):
    selector = _fitted(pool, target, seed=7)
    whole = selector.scores(pool)
    halves = np.concatenate([selector.scores(pool.iloc[:437]), selector.scores(pool.iloc[437:])])
    np.testing.assert_array_equal(whole, halves)
    shuffled = pool.sample(frac=1.0, random_state=0)
    np.testing.assert_array_equal(selector.scores(shuffled), whole[shuffled.index.to_numpy()])


def test_gumbel_noise_is_standard_gumbel(pool, target):
    noisy = _fitted(pool, target, seed=5, min_example_length=0).scores(pool)
    plain = _fitted(pool, target, top_k=True, min_example_length=0).scores(pool)
    noise = noisy - plain
    # standard Gumbel: mean = Euler's gamma 0.5772, std = pi / sqrt(6) = 1.2825 (1000 draws)
    assert noise.mean() == pytest.approx(0.5772, abs=0.12)
    assert noise.std() == pytest.approx(1.2825, abs=0.12)
    g = gumbel_noise([f"id-{i}" for i in range(20_000)], seed=0)
    assert np.isfinite(g).all() and g.mean() == pytest.approx(0.5772, abs=0.03)
    np.testing.assert_array_equal(g[:10], gumbel_noise([f"id-{i}" for i in range(10)], seed=0))


def test_resampling_follows_the_weights():
    # One-word documents: log weights log(4/3) for "alpha" and log(2/3) for "beta" (target 2:1,
    # pool 1:1), so importance resampling keeps alpha:beta at about 2:1; top-k keeps only alpha.
    def frame(texts, prefix):
        n = len(texts)
        return pd.DataFrame({"id": [f"{prefix}-{i}" for i in range(n)], "text": texts, "domain": ["x"] * n,
                             "source": ["s"] * n, "split": ["train"] * n})

    pool, target = frame(["alpha", "beta"] * 500, "pool"), frame(["alpha alpha beta"] * 3, "target")
    common = dict(ngrams=1, min_example_length=0)
    fractions = [(pool["text"][_fitted(pool, target, seed=s, **common).select(pool)] == "alpha").mean()
                 for s in range(5)]
    assert abs(np.mean(fractions) - 2 / 3) < 0.07, fractions  # 5 x 100 draws: std ~0.02
    assert (pool["text"][_fitted(pool, target, top_k=True, **common).select(pool)] == "alpha").all()


def test_short_documents_rank_last(target):
    long_code = _docs(n_prose=0, n_code=20, seed=9)
    short_prose = _docs(n_prose=20, n_code=0, seed=10, n_words=(20, 40), start=100)
    pool = pd.concat([long_code, short_prose], ignore_index=True)
    with_rule = _fitted(pool, target, top_k=True)  # min_example_length=100 (the reference's default)
    scores = with_rule.scores(pool)
    assert scores[20:].max() < scores[:20].min() - SHORT_PENALTY / 2
    assert (pool["domain"][with_rule.select(pool)] == "code").all()
    without = _fitted(pool, target, top_k=True, min_example_length=0)
    assert (pool["domain"][without.select(pool)] == "prose").all()  # short prose beats long code on weight


def test_bad_params_and_misuse(pool, target):
    for bad in ({"num_buckets": 0}, {"ngrams": 3}, {"ngrams": 0}, {"min_example_length": -1},
                {"target_laplace_smoothing": -0.5}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            DSIR.Params(keep_fraction=0.1, **bad)
    with pytest.raises(ValidationError, match="exactly one of budget_tokens and keep_fraction"):
        DSIR.Params()
    with pytest.raises(RuntimeError, match="call fit"):
        DSIR(DSIR.Params(keep_fraction=0.1)).scores(pool)
    selector = DSIR(DSIR.Params(keep_fraction=0.1))
    with pytest.raises(SelectionError, match="pool sample"):
        selector.fit(SelectionContext(stage="s", seed=0, target=target, pool_sample=pool.iloc[:0]))
    with pytest.raises(SelectionError, match="target set has no words"):
        selector.fit(SelectionContext(stage="s", seed=0, target=target.assign(text="  "), pool_sample=pool))


def test_registered_and_needs_target():
    from components.data.registry import SELECTORS

    assert SELECTORS.get("dsir") is DSIR
    # the select stage builds the target set (and raises when it is missing or empty) for such methods
    assert DSIR.needs_target and not DSIR.needs_tokenizer and DSIR.min_references == 0
    with pytest.raises(SelectionError, match="needs a non-empty target set"):
        DSIR(DSIR.Params(keep_fraction=0.1)).fit(SelectionContext(stage="s", seed=0, target=None))
