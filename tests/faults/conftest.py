"""The fault-injection suite: a nano workspace built once per session, copied per case.

Every case breaks one thing (a file, a process, the disk, an input) and asserts three things:
nothing is lost, nothing stale is served, and the message names the cause. Each case carries
``@pytest.mark.fault(outcome)``; ``benchmarks/fault_tally.py`` counts them into docs/.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults.helpers import NANO_STAGES, stage
from tests.helpers import make_workspace


@pytest.fixture(scope="session")
def built_nano(tmp_path_factory) -> Path:
    """The whole nano DAG, built once per session; cases work on copies (``nano_copy``)."""
    ws = make_workspace(tmp_path_factory.mktemp("built") / "ws")
    for name in NANO_STAGES:
        assert stage(ws, name) == 0, name
    return ws


@pytest.fixture
def nano_copy(built_nano, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(built_nano, ws, symlinks=True)
    return ws


