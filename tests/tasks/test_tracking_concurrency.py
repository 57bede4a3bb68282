"""Stages side by side log to one SQLite MLflow store from several processes at once
(`paperdag run --max-parallel`): none of them may fail with "database is locked"."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import make_workspace, mlflow_client

WRITERS = 4
STEPS = 60

WRITER = textwrap.dedent("""
    import sys
    from tasks.tracking import Tracker
    from tasks.workspace import Workspace

    ws = Workspace.from_env(sys.argv[1])
    ws.configure_environment()
    tracker = Tracker(ws, "concurrency")
    with tracker.run(f"writer {sys.argv[2]}", {"paperdag.stage": f"writer{sys.argv[2]}"}) as run_id:
        tracker.log_params(run_id, {"writer": sys.argv[2], "lr": 0.003})
        for step in range(int(sys.argv[3])):  # a training loop's log_every cadence, with no pause
            tracker.log_metrics(run_id, {"loss": 1.0 / (step + 1), "lr": 0.003, "tokens": step * 256}, step=step)
            tracker.set_tags(run_id, {"paperdag.step": str(step)})
""")


def test_four_processes_logging_at_once_to_one_sqlite_store_all_finish(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ws), str(i), str(STEPS)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(WRITERS)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * WRITERS, "\n".join(o[-1500:] for o in outputs)
    assert not any("database is locked" in o for o in outputs)
    client = mlflow_client(ws)
    runs = client.search_runs([client.get_experiment_by_name("concurrency").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * WRITERS
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS))
