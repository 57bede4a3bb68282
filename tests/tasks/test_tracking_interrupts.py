"""Ctrl-C while a stage logs to the local SQLite store: the run still ends KILLED, at once.

Cut inside a store write, SQLAlchemy left the process's own transaction holding the database
lock; ending the run then waited out the 20 s busy timeout, failed, and left the run RUNNING
(3 runs in 20 here before ``tasks.tracking._interrupts_deferred``; in CI, a parallel run's
worker was killed by its flow process during that wait)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.helpers import REPO, make_workspace

# One process, many interrupted runs (a process start costs more than all of them): each run logs
# per-step metrics in a tight loop, as a training stage's step logger does, until a SIGINT sent
# from another thread at a varying moment lands wherever the main thread happens to be.
INTERRUPTED_RUNS = textwrap.dedent("""
    import json, os, signal, sys, threading
    from pathlib import Path
    from tasks.tracking import Tracker
    from tasks.workspace import Workspace

    ws = Workspace(Path(sys.argv[1]))
    ws.configure_environment()
    tracker = Tracker(ws, "interrupts")
    for i in range(int(sys.argv[2])):
        delay = 0.05 + (i * 0.037) % 0.25  # spread over the log loop, the same each time
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            with tracker.run(f"r{i}", {}) as run_id:
                log = tracker.step_logger(run_id)
                step = 0
                while True:
                    log(step, {"loss": 1.0, "lr": 0.1, "tokens_per_s": 3.0})
                    step += 1
        except KeyboardInterrupt:
            pass
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=1000)
    print(json.dumps(sorted(r.info.status for r in runs)))
""")


def test_runs_interrupted_while_logging_to_sqlite_all_end_killed(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_RUNS, str(ws), "25"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert statuses == ["KILLED"] * 25, proc.stderr[-3000:]
    assert "could not mark MLflow run" not in proc.stderr and "database is locked" not in proc.stderr
