import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from components.data.standard_corpus import StandardCorpus  # noqa: E402


@pytest.fixture(scope="session")
def default_corpus() -> pd.DataFrame:
    """The default corpus (seed 0), built once: ~2.9k docs, ~2.6 MB."""
    return StandardCorpus().build()


def _make_docs(texts, **columns) -> pd.DataFrame:
    n = len(texts)
    data = {
        "id": [f"doc-{i:04d}" for i in range(n)],
        "text": list(texts),
        "domain": ["prose"] * n,
        "source": ["test"] * n,
        "split": ["train"] * n,
        "noise_label": [""] * n,
    }
    data.update(columns)
    return pd.DataFrame(data)


@pytest.fixture
def make_docs():
    """Builds a valid document table from texts; keyword columns override or add columns."""
    return _make_docs
