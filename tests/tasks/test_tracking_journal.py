"""The tracking journal: an end that could not reach the store is replayed by the next tracker
on that store, with the status, error and end time it had (tasks/tracking.py)."""
from __future__ import annotations

import json

from tasks.tracking import JOURNAL, Tracker
from tasks.workspace import Workspace
from tests.helpers import make_workspace


def _tracker(ws_root) -> Tracker:
    ws = Workspace(ws_root)
    ws.configure_environment()
    return Tracker(ws, "journal")


def test_the_next_tracker_ends_journaled_runs_and_keeps_other_stores_entries(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    first = _tracker(ws)
    ended, deleted = (first.client.create_run(first.experiment_id, run_name=name).info.run_id for name in ("a", "b"))
    first.client.delete_run(deleted)
    other_store = {"uri": "http://127.0.0.1:1", "run_id": "0" * 32, "status": "FAILED", "error": "x", "end_time": 1}
    assert first._journal_end(ended, "FAILED", "TrackingServerError: server went away")
    assert first._journal_end(deleted, "KILLED", "interrupted")
    journal = ws / ".paperdag" / JOURNAL
    with open(journal, "a") as handle:
        handle.write(json.dumps(other_store) + "\n" + '{"uri": "sqlite:///cut sh')  # a line cut short by a crash
    end_time = json.loads(journal.read_text().splitlines()[0])["end_time"]

    second = _tracker(ws)  # replays on open
    run = second.client.get_run(ended)
    assert (run.info.status, run.info.end_time) == ("FAILED", end_time)
    assert run.data.tags["paperdag.error"] == "TrackingServerError: server went away"
    assert [json.loads(line) for line in journal.read_text().splitlines()] == [other_store]


def test_a_journaled_finish_does_not_overwrite_a_run_that_already_ended(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    tracker = _tracker(ws)
    with tracker.run("stage", {}) as run_id:
        pass
    assert tracker._journal_end(run_id, "KILLED", "stale")
    _tracker(ws)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "paperdag.error" not in run.data.tags
    assert (ws / ".paperdag" / JOURNAL).read_text() == ""
