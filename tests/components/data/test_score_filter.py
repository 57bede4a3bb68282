import numpy as np
import pytest
from pydantic import ValidationError

from components.data.registry import SELECTORS
from components.data.score_filter import ScoreFilter
from components.data.selector import SelectionError


def _docs(make_docs, scores, **columns):
    return make_docs([f"doc {i}" for i in range(len(scores))], quality_score=scores, **columns)


def test_threshold_keeps_the_chosen_side_inclusive(make_docs):
    docs = _docs(make_docs, [0.1, 0.5, 0.9, 0.5])
    above = ScoreFilter(ScoreFilter.Params(column="quality_score", threshold=0.5))
    assert above.select(docs).tolist() == [False, True, True, True]
    below = ScoreFilter(ScoreFilter.Params(column="quality_score", threshold=0.5, keep="below"))
    assert below.select(docs).tolist() == [True, True, False, True]
    assert above.stats == {"n_docs": 4, "n_removed": 1, "n_nan": 0}
    assert above.facts["score_filter_kept_mean"] == pytest.approx(1.9 / 3)


def test_keep_fraction_percentile_and_invert(make_docs):
    scores = np.random.default_rng(0).permutation(10).astype(float)  # 0..9 shuffled
    docs = _docs(make_docs, scores)
    top = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_fraction=0.3)).select(docs)
    assert sorted(scores[top]) == [7.0, 8.0, 9.0]
    same = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_percentile=30)).select(docs)
    assert same.tolist() == top.tolist()
    bottom = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_fraction=0.3, invert=True))
    assert sorted(scores[bottom.select(docs)]) == [0.0, 1.0, 2.0]
    assert bottom.facts["score_filter_cutoff"] == 2.0


def test_fraction_by_group_ranks_within_each_domain(make_docs):
    docs = _docs(make_docs, [1, 2, 3, 4, 100, 200, 300, 400], domain=["a"] * 4 + ["b"] * 4)
    keep = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_fraction=0.5, by="domain")).select(docs)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    keep = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_fraction=0.5)).select(docs)
    assert keep.tolist() == [False] * 4 + [True] * 4


def test_nan_scores_are_dropped_or_kept_and_not_ranked(make_docs):
    docs = _docs(make_docs, [np.nan, 1.0, 2.0, 3.0, 4.0])
    dropped = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_fraction=0.5))
    assert dropped.select(docs).tolist() == [False, False, False, True, True]  # half of the 4 scored docs
    assert dropped.stats["n_nan"] == 1
    kept = ScoreFilter(ScoreFilter.Params(column="quality_score", keep_fraction=0.5, nan="keep"))
    assert kept.select(docs).tolist() == [True, False, False, True, True]
    kept = ScoreFilter(ScoreFilter.Params(column="quality_score", threshold=10, nan="keep"))
    assert kept.select(docs).tolist() == [True, False, False, False, False]


def test_missing_or_non_numeric_column_lists_numeric_columns(make_docs):
    docs = _docs(make_docs, [1.0, 2.0], year=[2019, 2020])
    with pytest.raises(SelectionError, match=r"no column 'perplexity_score'.*numeric columns: quality_score, year"):
        ScoreFilter(ScoreFilter.Params(column="perplexity_score", threshold=1)).select(docs)
    with pytest.raises(SelectionError, match=r"column 'source' is \w+, not numeric; numeric columns: quality"):
        ScoreFilter(ScoreFilter.Params(column="source", threshold=1)).select(docs)
    with pytest.raises(SelectionError, match="by='topic' is not a column"):
        ScoreFilter(ScoreFilter.Params(column="year", keep_fraction=0.5, by="topic")).select(docs)
    # a metadata column works as a score
    keep = ScoreFilter(ScoreFilter.Params(column="year", threshold=2020)).select(docs)
    assert keep.tolist() == [False, True]


def test_params_need_exactly_one_rule():
    with pytest.raises(ValidationError, match="exactly one of threshold, keep_fraction and keep_percentile"):
        ScoreFilter.Params(column="x")
    with pytest.raises(ValidationError, match="exactly one"):
        ScoreFilter.Params(column="x", threshold=1, keep_fraction=0.5)
    with pytest.raises(ValidationError, match="keep: below"):
        ScoreFilter.Params(column="x", threshold=1, invert=True)
    with pytest.raises(ValidationError):
        ScoreFilter.Params(column="x", keep_percentile=150)
    assert SELECTORS.get("score_filter") is ScoreFilter
