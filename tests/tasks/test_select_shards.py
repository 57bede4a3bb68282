"""Shard scoring: parallel Prefect tasks give the same scores as one pass, and runner errors are clear."""
from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.data.parquet_io import ShardWriter, document_shards
from components.data.random_selection import RandomSelection
from components.data.selector import SelectionError
from tasks.select import _map_shards, shard_task_runner


def _docs(n: int, start: int) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"d{i}" for i in range(start, start + n)], "text": [f"text {i}" for i in range(n)],
                         "domain": "prose", "source": "test", "split": "train", "noise_label": ""})


@pytest.fixture
def shards(tmp_path):
    writer = ShardWriter(tmp_path / "docs")
    for k in range(3):
        writer.write(_docs(5, 5 * k))
    writer.close()
    return document_shards(tmp_path / "docs")


def test_parallel_shard_tasks_match_one_pass(shards):
    selector = RandomSelection(RandomSelection.Params(keep_fraction=0.5, seed=3))
    serial = _map_shards(selector, shards, None)  # outside a task run: one after another

    @task(cache_policy=NO_CACHE, persist_result=False)
    def stage():
        return _map_shards(selector, shards, None)

    @flow(persist_result=False)
    def pipeline():
        return stage()

    parallel = pipeline()
    assert len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert list(a["ids"]) == list(b["ids"])
        np.testing.assert_array_equal(a["scores"], b["scores"])


def test_shard_ids_are_unique_across_shards(tmp_path):
    writer = ShardWriter(tmp_path / "docs")
    writer.write(_docs(3, 0))
    with pytest.raises(ValueError, match="duplicate ids across shards"):
        writer.write(_docs(3, 2))


@pytest.mark.parametrize("spec, message", [
    ("spark:x", "expected threads"),
    ("dask:tcp://127.0.0.1:1", "prefect-dask"),
])
def test_shard_runner_spec_errors(spec, message):
    if spec.startswith("dask") and importlib.util.find_spec("prefect_dask"):
        pytest.skip("prefect-dask is installed here")
    with pytest.raises(SelectionError, match=message):
        shard_task_runner(spec)
