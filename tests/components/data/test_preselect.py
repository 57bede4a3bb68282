import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.ngram_classifier import HashedNgramClassifier
from components.data.preselect import PreSelect, label_by_pair_score, pair_agreement_scores
from components.data.registry import SELECTORS
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.model.presets import build_model
from tests.components.data.text_worlds import english, gibberish, train_ladder


def docs(texts, domain, prefix):
    return pd.DataFrame({"id": [f"{prefix}-{i:03d}" for i in range(len(texts))], "text": texts,
                         "domain": [domain] * len(texts)})


@pytest.fixture(scope="module")
def world():
    """Domain A (English) and B (gibberish); a ladder of nano models trained 0/10/40 steps on A."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    a = [english(rng) for _ in range(200)]
    b = [gibberish(rng) for _ in range(100)]
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=384, seq_len=64)).train(a + b)
    ladder = train_ladder(tokenizer, a[:80], snapshots=(0, 10, 40))
    # listed worst-last on purpose: PreSelect must rank the ladder by target loss, not by order
    references = [ReferenceModel(f"steps{k}", ladder[k]) for k in (40, 0, 10)]
    return dict(
        tokenizer=tokenizer, references=references,
        target=docs(a[80:100], "a", "target"),
        pool_sample=pd.concat([docs(a[100:160], "a", "pa"), docs(b[:60], "b", "pb")], ignore_index=True),
        fresh=pd.concat([docs(a[160:200], "a", "fa"), docs(b[60:100], "b", "fb")], ignore_index=True),
    )


def context(world, **overrides):
    kw = dict(stage="preselect", seed=0, target=world["target"], tokenizer=world["tokenizer"],
              references=world["references"], pool_sample=world["pool_sample"])
    kw.update(overrides)
    return SelectionContext(**kw)


@pytest.fixture(scope="module")
def fitted(world):
    selector = PreSelect(PreSelect.Params(keep_fraction=0.5))
    selector.fit(context(world))
    return selector


def test_registered_and_declares_needs():
    assert SELECTORS.get("preselect") is PreSelect
    assert PreSelect.needs_target and PreSelect.needs_tokenizer and PreSelect.min_references == 3


def test_pair_agreement_scores_by_hand():
    bench = np.array([2.0, 1.0, 3.0])  # model 1 best, then 0, then 2
    losses = np.array([[2.0, 2.0, 1.0, 5.0],
                       [1.0, 3.0, 1.0, 4.0],
                       [3.0, 1.0, 1.0, 3.0]])
    scores, n_pairs = pair_agreement_scores(bench, losses)
    assert n_pairs == 3
    # doc 0 orders all pairs right; doc 1 none; doc 2 ties everywhere (no point); doc 3: only 1 < 0
    assert scores.tolist() == [3, 0, 0, 1]
    tied_bench = pair_agreement_scores(np.array([1.0, 1.0, 2.0]), losses)
    assert tied_bench[1] == 2  # a pair with equal benchmarks is not ranked
    with pytest.raises(ValueError, match="n_models=3"):
        pair_agreement_scores(bench, losses[:2])


def test_label_by_pair_score():
    positives, negatives, top = label_by_pair_score(np.array([3, 0, 1, 3, 0, 2]), 3, seed=0)
    assert top == 3 and positives.tolist() == [0, 3] and sorted(negatives.tolist()) == [1, 4]
    # no perfect score: the highest score present is positive; negatives lowest first
    positives, negatives, top = label_by_pair_score(np.array([2, 0, 1, 2, 2]), 6, seed=0)
    assert top == 2 and positives.tolist() == [0, 3, 4] and negatives.tolist() == [1, 2]
    # ties among the lowest scores are broken by the seed
    picks = {tuple(label_by_pair_score(np.array([1] + [0] * 8), 1, seed=s)[1]) for s in range(6)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="all be equal"):
        label_by_pair_score(np.array([1, 1]), 3, seed=0)


def test_ladder_labels_and_classifier(world, fitted):
    facts = fitted.facts
    # the ladder ranks by target loss: 40 steps best, untrained worst
    assert facts["benchmark_loss_steps40"] < facts["benchmark_loss_steps10"] < facts["benchmark_loss_steps0"]
    assert facts["ranked_pairs"] == 3 and facts["positive_score"] == 3
    labelled = fitted.labelled.merge(world["pool_sample"][["id", "domain"]], on="id")
    positives = labelled[labelled["label"] == 1]
    negatives = labelled[labelled["label"] == 0]
    # Measured: all 60 A docs are perfect (positives), the 60 negatives are all B.
    assert len(positives) >= 30 and (positives["domain"] == "a").mean() >= 0.9
    assert len(negatives) == len(positives) and (negatives["domain"] == "b").mean() >= 0.9
    assert facts["positives"] == len(positives) and facts["negatives"] == len(negatives)
    assert facts["classifier_train_accuracy"] >= 0.95 and facts["classifier_heldout_accuracy"] >= 0.9
    # on documents the classifier never saw, A scores above B by a clear margin
    fresh = world["fresh"]
    scores = fitted.scores(fresh)
    is_a = (fresh["domain"] == "a").to_numpy()
    assert scores[is_a].min() > scores[~is_a].max()
    assert scores[is_a].mean() - scores[~is_a].mean() > 2.0
    keep = fitted.keep_mask(fresh)
    assert keep[is_a].all() and not keep[~is_a].any()


def test_deterministic_and_shard_independent(world, fitted):
    again = PreSelect(PreSelect.Params(keep_fraction=0.5))
    again.fit(context(world))
    fresh = world["fresh"]
    np.testing.assert_array_equal(again.scores(fresh), fitted.scores(fresh))
    assert again.facts == fitted.facts
    parts = np.concatenate([fitted.scores(fresh.iloc[i:i + 9]) for i in range(0, len(fresh), 9)])
    np.testing.assert_allclose(parts, fitted.scores(fresh), rtol=1e-12, atol=1e-12)


def test_bad_inputs(world):
    selector = PreSelect(PreSelect.Params(keep_fraction=0.5))
    same = [ReferenceModel(f"copy{i}", world["references"][0].model) for i in range(3)]
    with pytest.raises(SelectionError, match="equal target losses"):
        selector.fit(context(world, references=same))
    with pytest.raises(SelectionError, match="at least 3"):
        selector.fit(context(world, references=world["references"][:2]))
    with pytest.raises(SelectionError, match="target"):
        selector.fit(context(world, target=world["target"].iloc[:0]))
    with pytest.raises(SelectionError, match="pool sample"):
        selector.fit(context(world, pool_sample=None))
    other = build_model("nano", len(world["tokenizer"]) + 8, 64, seed=0)
    with pytest.raises(SelectionError, match="reference 'other'.*vocabulary"):
        selector.fit(context(world, references=world["references"][:2] + [ReferenceModel("other", other)]))
    with pytest.raises(ValueError, match="fit"):
        PreSelect(PreSelect.Params(keep_fraction=0.5)).score(world["fresh"])
    for bad in (dict(heldout_fraction=1.0), dict(l2=0.0), dict(num_buckets=1), dict(max_iter=0)):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            PreSelect.Params(keep_fraction=0.5, **bad)


# --- the n-gram classifier ---------------------------------------------------------------------

def ordered_pairs(rng, swap, n_pairs=12):
    """Texts of word pairs (x_i y_i); ``swap`` writes each as (y_i x_i): same unigrams, other bigrams."""
    first = [f"w{i}" for i in range(8)]
    second = [f"v{i}" for i in range(8)]
    picks = rng.integers(0, 8, size=n_pairs)
    return " ".join(f"{second[i]} {first[i]}" if swap else f"{first[i]} {second[i]}" for i in picks)


def topical(rng, words):
    shared = ["the", "of", "and", "a", "to", "is"]
    return " ".join(rng.choice(words + shared, size=25))


def test_classifier_separates_topics_and_needs_bigrams_for_order():
    rng = np.random.default_rng(0)
    sports = ["goal", "match", "team", "score", "coach", "league"]
    cooking = ["oven", "salt", "recipe", "flour", "butter", "bake"]
    texts = [topical(rng, sports) for _ in range(50)] + [topical(rng, cooking) for _ in range(50)]
    labels = np.array([1] * 50 + [0] * 50)
    train = np.r_[0:35, 50:85]
    test = np.r_[35:50, 85:100]
    clf = HashedNgramClassifier(num_buckets=4096).fit([texts[i] for i in train], labels[train])
    assert clf.converged
    assert clf.accuracy([texts[i] for i in test], labels[test]) == 1.0
    log_odds = clf.decision_function([texts[i] for i in test])
    assert log_odds[:15].min() > 0 > log_odds[15:].max()
    np.testing.assert_allclose(clf.predict_proba(texts[:3]), 1 / (1 + np.exp(-clf.decision_function(texts[:3]))))

    # word order only: unigrams cannot tell the classes apart, bigrams can (fastText's wordNgrams=2)
    texts = [ordered_pairs(rng, swap=False) for _ in range(60)] + [ordered_pairs(rng, swap=True) for _ in range(60)]
    labels = np.array([1] * 60 + [0] * 60)
    train = np.r_[0:40, 60:100]
    test = np.r_[40:60, 100:120]
    held_texts = [texts[i] for i in test]
    bigrams = HashedNgramClassifier(num_buckets=4096).fit([texts[i] for i in train], labels[train])
    unigrams = HashedNgramClassifier(num_buckets=4096, ngram_orders=(1,)).fit([texts[i] for i in train], labels[train])
    assert bigrams.accuracy(held_texts, labels[test]) == 1.0
    assert unigrams.accuracy(held_texts, labels[test]) <= 0.75


def test_classifier_is_deterministic():
    rng = np.random.default_rng(1)
    texts = [topical(rng, ["alpha", "beta", "gamma"]) for _ in range(20)] + \
        [topical(rng, ["delta", "omega", "sigma"]) for _ in range(20)]
    labels = [1] * 20 + [0] * 20
    first = HashedNgramClassifier(num_buckets=2048).fit(texts, labels).decision_function(texts)
    second = HashedNgramClassifier(num_buckets=2048).fit(texts, labels).decision_function(texts)
    np.testing.assert_array_equal(first, second)
    # a text without words scores the bias alone, and scoring is per text
    clf = HashedNgramClassifier(num_buckets=2048).fit(texts, labels)
    assert clf.decision_function(["   "])[0] == pytest.approx(clf.bias)
    np.testing.assert_allclose(clf.decision_function(texts[:5]),
                               np.concatenate([clf.decision_function([t]) for t in texts[:5]]))


def test_classifier_bad_params():
    for kwargs, name in ((dict(num_buckets=1), "num_buckets"), (dict(l2=0.0), "l2"), (dict(l2=float("nan")), "l2"),
                         (dict(max_iter=0), "max_iter"), (dict(ngram_orders=(3,)), "ngram_orders"),
                         (dict(ngram_orders=()), "ngram_orders")):
        with pytest.raises(ValueError, match=name):
            HashedNgramClassifier(**kwargs)
    clf = HashedNgramClassifier(num_buckets=64)
    with pytest.raises(ValueError, match="not fitted"):
        clf.decision_function(["a"])
    with pytest.raises(ValueError, match="both classes"):
        clf.fit(["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        clf.fit(["a", "b"], [0, 2])
    with pytest.raises(ValueError, match="one entry per text"):
        clf.fit(["a", "b"], [0, 1, 1])
    clf.fit(["a b", "c d"], [0, 1])
    with pytest.raises(ValueError, match="one label per text"):
        clf.accuracy(["a"], [0, 1])
