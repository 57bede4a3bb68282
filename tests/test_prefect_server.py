"""The local Prefect server's start-up hook: work the CLI does while the server boots."""
from __future__ import annotations

import time

import pytest

from flows.prefect_server import ManagedPrefectServer
from tasks.tracking import unhealthy


def test_work_given_to_a_starting_server_runs_once_while_it_boots(tmp_path):
    server = ManagedPrefectServer(tmp_path / "prefect")
    seen = []

    def meanwhile():
        seen.append((server.process.poll(), unhealthy(server.api_url, timeout=1)))

    try:
        server.start(meanwhile)
        assert unhealthy(server.api_url) is None
    finally:
        server.stop()
    assert len(seen) == 1
    still_running, answer = seen[0]
    assert still_running is None  # the server process had been spawned and was alive
    assert answer is not None  # and was not answering yet: the work overlapped its boot


def test_a_failure_in_that_work_stops_the_server_and_is_raised(tmp_path):
    server = ManagedPrefectServer(tmp_path / "prefect")
    spawned = []

    def meanwhile():
        spawned.append(server.process)
        raise ImportError("No module named 'mlflow'")

    with pytest.raises(ImportError, match="mlflow"):
        server.start(meanwhile)
    deadline = time.monotonic() + 5
    while spawned[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spawned[0].poll() is not None  # no server left behind
    assert server.process is None
