import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from components.data.metadata_filter import MetadataFilter
from components.data.registry import SELECTORS
from components.data.selector import SelectionError


@pytest.fixture
def docs(make_docs):
    return make_docs(
        [f"doc {i}" for i in range(6)],
        source=["web", "books", "web", "code", "books", "web"],
        year=[2015, 2017, 2019, np.nan, 2021, 2023],
        crawled=["2015-03-01", "2017-06-30", "2019-01-01", None, "2021-12-31", "2023-07-04"],
    )


def keep(docs, **params):
    return MetadataFilter(MetadataFilter.Params(**params)).select(docs).tolist()


def test_values_and_exclude(docs):
    assert keep(docs, column="source", values=["web", "code"]) == [True, False, True, True, False, True]
    assert keep(docs, column="source", values=["web"], exclude=True) == [False, True, False, True, True, False]
    assert keep(docs, column="year", values=[2019, 2021]) == [False, False, True, False, True, False]


def test_numeric_range_is_inclusive_and_skips_missing(docs):
    assert keep(docs, column="year", min=2017, max=2021) == [False, True, True, False, True, False]
    assert keep(docs, column="year", max=2017) == [True, True, False, False, False, False]
    assert keep(docs, column="year", min=2019, exclude=True) == [True, True, False, True, False, False]


def test_date_strings_compare_as_dates(docs):
    assert keep(docs, column="crawled", min="2017-06-30", max="2021-12-31") == [False, True, True, False, True, False]
    assert keep(docs, column="crawled", min=2020) == [False, False, False, False, True, True]  # a year is a date
    dated = docs.assign(crawled=pd.to_datetime(docs["crawled"]))
    assert keep(dated, column="crawled", max="2018") == [True, True, False, False, False, False]


def test_clear_errors(docs):
    with pytest.raises(SelectionError, match=r"no column 'language' in the documents; columns: id, text"):
        keep(docs, column="language", values=["en"])
    with pytest.raises(SelectionError, match=r"\['news'\] never occur in column 'source'.*'books', 'code', 'web'"):
        keep(docs, column="source", values=["web", "news"])
    with pytest.raises(SelectionError, match="column 'year' is numeric; min/max must be numbers"):
        keep(docs, column="year", min="2019")
    with pytest.raises(SelectionError, match="needs a numeric or date column; column 'source'"):
        keep(docs, column="source", min="a")
    with pytest.raises(ValidationError, match="either values or a range"):
        MetadataFilter.Params(column="year")
    with pytest.raises(ValidationError, match="either values or a range"):
        MetadataFilter.Params(column="year", values=[2019], min=2018)
    assert SELECTORS.get("metadata_filter") is MetadataFilter
