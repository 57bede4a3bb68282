"""1.5-Pints' quality review: the borderline rule and the person's label file."""
from __future__ import annotations

import numpy as np
import pytest

from components.data.quality_review import borderline, read_review_labels
from components.data.selector import SelectionError


def test_borderline_takes_the_documents_nearest_the_cut_on_both_sides():
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    keep = scores >= 5.0  # the budget kept the top five
    picks = borderline(scores, keep, 4, exclude=np.zeros(8, dtype=bool))
    assert sorted(scores[picks].tolist()) == [3.0, 4.0, 5.0, 6.0]
    reviewed = np.zeros(8, dtype=bool)
    reviewed[[3, 4]] = True  # already labelled: the next queue moves past them
    assert sorted(scores[borderline(scores, keep, 4, reviewed)].tolist()) == [3.0, 4.0, 7.0, 8.0]


def test_labels_are_read_back_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a", "text": "good text", "label": "keep"}\n'
                    '{"id": "b", "text": "spam spam", "label": "drop"}\n'
                    '{"id": "c", "text": "not reviewed yet", "label": null}\n\n')
    assert read_review_labels(path) == {"a": (1, "good text"), "b": (0, "spam spam")}
    path.write_text('{"id": "a", "text": "t", "label": "keep"}\nnot json\n')
    with pytest.raises(SelectionError, match=r"labels\.jsonl:2: not a JSON object per line"):
        read_review_labels(path)
    path.write_text('{"text": "t", "label": "keep"}\n')
    with pytest.raises(SelectionError, match=r"labels\.jsonl:1: each line needs string fields id and text"):
        read_review_labels(path)


@pytest.mark.parametrize("apply_review", [True, False])
def test_labels_decide_reviewed_scores_only_when_applied(tmp_path, apply_review):
    import pandas as pd

    from components.data.quality_review import LABELED_SCORE, QualityReview
    from components.data.selector import SelectionContext

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"id": "good", "text": "zzz qqq xxx", "label": "keep"}\n'
                      '{"id": "bad", "text": "the river runs to the sea", "label": "drop"}\n')
    selector = QualityReview(QualityReview.Params(target_domain="prose", keep_fraction=0.5, review_labels=labels,
                                                  apply_review=apply_review, num_buckets=1 << 10))
    target = pd.DataFrame({"text": ["the river runs to the sea", "the sea is wide and the river long"] * 4})
    pool = pd.DataFrame({"text": ["zzz qqq xxx", "qqq zzz www xxx"] * 4})
    selector.fit(SelectionContext(stage="review", seed=0, target=target, pool_sample=pool))
    scores = selector.score(pd.DataFrame({"id": ["good", "bad"], "text": ["zzz qqq xxx", "the river runs to the sea"]}))
    assert selector.labeled_ids() == {"good", "bad"}  # measured apart either way
    if apply_review:
        assert scores.tolist() == [LABELED_SCORE, -LABELED_SCORE] and selector.reviewed_ids() == {"good", "bad"}
        assert selector.facts["review_labels_used"] == 2
    else:  # the classifier alone: the prose-like document scores above the pool-like one
        assert scores[1] > scores[0] and abs(scores).max() < LABELED_SCORE and selector.reviewed_ids() == set()
        assert selector.facts["review_labels_used"] == 0
