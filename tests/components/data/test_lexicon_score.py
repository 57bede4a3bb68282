import numpy as np
import pytest
from pydantic import ValidationError

from components.data.lexicon_score import LexiconScore
from components.data.registry import SELECTORS
from components.data.score_filter import ScoreFilter

CLEAN = "The parser builds a tree from the tokens and hands it to the compiler for code generation."
SPAM = "Click here for cheap casino bonus spins, act now and claim your prize today, winner!"
ABUSE = "You are a stupid idiot and this is pathetic trash, shut up."


def test_rate_counts_words_and_phrases(make_docs):
    selector = LexiconScore(LexiconScore.Params(keep_fraction=1.0))
    rates = selector.rates([CLEAN, SPAM, ABUSE, "", "Click the here button"])
    assert rates[0] == 0.0 and rates[3] == 0.0 and rates[4] == 0.0  # "click here" only as a phrase
    # SPAM: click here (2) cheap casino bonus (3) act now (2) prize winner (2) = 9 of 15 words
    assert rates[1] == pytest.approx(9 / 15)
    # ABUSE: stupid idiot pathetic trash shut up = 6 of 12 words
    assert rates[2] == pytest.approx(6 / 12)
    scores = selector.scores(make_docs([CLEAN, SPAM, ABUSE]))
    np.testing.assert_allclose(scores, 1 - rates[:3])


def test_keep_fraction_keeps_the_cleanest_and_invert_the_dirtiest(make_docs):
    docs = make_docs([SPAM, CLEAN, ABUSE, CLEAN.replace("tree", "cheap tree")])
    keep = LexiconScore(LexiconScore.Params(keep_fraction=0.5)).select(docs)
    assert keep.tolist() == [False, True, False, True]
    keep = LexiconScore(LexiconScore.Params(keep_fraction=0.25, invert=True)).select(docs)
    assert keep.tolist() == [True, False, False, False]


def test_custom_lexicon_and_annotation_then_threshold_sweep(make_docs):
    selector = LexiconScore(LexiconScore.Params(keep_fraction=1.0, lexicon=("tree", "compiler")))
    docs = make_docs([CLEAN, SPAM])
    assert selector.select(docs).tolist() == [True, True]  # keep_fraction=1.0 only annotates
    # the select stage writes the scores to `lexicon_score_score`; a score_filter then sweeps a threshold
    docs["lexicon_score_score"] = selector.scores(docs)
    assert docs["lexicon_score_score"].tolist() == pytest.approx([1 - 2 / 17, 1.0])
    keep = ScoreFilter(ScoreFilter.Params(column="lexicon_score_score", threshold=0.95)).select(docs)
    assert keep.tolist() == [False, True]


def test_bad_lexicon_and_registry():
    with pytest.raises(ValidationError, match="without letters"):
        LexiconScore.Params(keep_fraction=1.0, lexicon=("ok", "123"))
    with pytest.raises(ValidationError):
        LexiconScore.Params(keep_fraction=1.0, lexicon=())
    assert SELECTORS.get("lexicon_score") is LexiconScore
