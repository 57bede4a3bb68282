"""repeat_docs: SnowCoder phase 2's 4x repetition of the selected documents."""
import pandas as pd
import pytest

from components.data.registry import SELECTORS
from components.data.repeat_docs import RepeatDocs
from components.data.schema import validate_documents
from components.data.selector import SelectionContext, SelectionError

CTX = SelectionContext(stage="stage repeat (repeat_docs)", seed=0)


def _docs(n):
    return pd.DataFrame({"id": [f"d{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)],
                         "domain": ["code"] * n, "source": ["stdlib"] * n, "split": ["train"] * n,
                         "snowcoder_score": [i / n for i in range(n)]})


def test_repeats_with_unique_ids():
    docs = _docs(5)
    out = RepeatDocs(RepeatDocs.Params(times=4)).transform(docs, CTX)
    assert len(out) == 20 and out["id"].is_unique
    assert out["id"].iloc[:5].tolist() == docs["id"].tolist()  # the first copy keeps its id
    assert out["id"].iloc[5:10].tolist() == [f"d{i}#r1" for i in range(5)]
    assert set(out["id"]) >= {"d4#r3"} and not out["id"].str.endswith("#r4").any()
    assert (out["text"].value_counts() == 4).all()
    assert (out["source"] == "stdlib").all() and (out["domain"] == "code").all()
    assert out.groupby("text")["snowcoder_score"].nunique().eq(1).all()  # other columns ride along
    validate_documents(out.assign(noise_label=""), "repeat_docs output")


def test_times_one_is_identity_and_default_is_four():
    docs = _docs(3)
    pd.testing.assert_frame_equal(RepeatDocs(RepeatDocs.Params(times=1)).transform(docs, CTX), docs)
    assert RepeatDocs().params.times == 4 and len(RepeatDocs().transform(docs, CTX)) == 12


def test_errors():
    with pytest.raises(ValueError, match="times"):
        RepeatDocs.Params(times=0)
    docs = _docs(2)
    docs.loc[1, "id"] = "d0#r1"  # already looks like a copy of d0
    with pytest.raises(SelectionError, match="'d0#r1' would occur twice"):
        RepeatDocs(RepeatDocs.Params(times=2)).transform(docs, CTX)
    with pytest.raises(TypeError, match="transform"):
        RepeatDocs().keep_mask(docs)


def test_registered():
    assert SELECTORS.get("repeat_docs") is RepeatDocs
