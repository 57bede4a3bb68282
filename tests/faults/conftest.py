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




# -- the tally (benchmarks/fault_tally.py sets PAPERDAG_FAULT_TALLY to a JSON path) ----------------
_TALLY: list[dict] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("fault")
    if marker is not None and (report.when == "call" or (report.when == "setup" and not report.passed)):
        _TALLY.append({"case": item.nodeid, "outcome": marker.args[0], "passed": report.passed,
                       "skipped": report.skipped, "seconds": round(report.duration, 2)})
    return report


def pytest_sessionfinish(session):
    import json
    import os

    target = os.environ.get("PAPERDAG_FAULT_TALLY")
    if target and _TALLY:
        Path(target).write_text(json.dumps(_TALLY, indent=1))
