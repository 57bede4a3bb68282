"""Helpers of the fault-injection suite (importable as ``tests.faults.helpers``)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flows.cli import main
from tests.helpers import mlflow_client

NANO_STAGES = ("corpus", "filter", "dedup", "tokenize", "pretrain_dense", "pretrain_spdf", "finetune_spdf",
               "finetune_prose", "finetune_code", "distill", "quantize", "merge", "evaluate")


def stage(ws: Path, name: str, *args: str) -> int:
    return main(["--workspace", str(ws), "stage", "nano", name, "--no-progress", *args])


def artifact_dir(ws: Path, stage_name: str) -> Path:
    """The artifact directory of a nano stage, by the stage name recorded in its manifest."""
    import json

    for manifest in sorted(ws.glob("artifacts/*/*/manifest.json")):
        if json.loads(manifest.read_text()).get("stage") == stage_name:
            return manifest.parent
    raise AssertionError(f"no artifact of stage {stage_name} in {ws}")


def runs(ws: Path) -> list:
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("nano")
    return client.search_runs([exp.experiment_id], max_results=2000) if exp else []


def no_run_left_running(ws: Path) -> bool:
    return all(r.info.status != "RUNNING" for r in runs(ws))


def temp_dirs(ws: Path) -> list[Path]:
    return sorted(ws.glob("artifacts/*/.tmp-*"))


def cli_env(ws: Path, **extra: str) -> dict:
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _sigint_default() -> None:
    """A terminal's foreground process has Ctrl-C at its default; a shell's background job
    (``pytest &``, ``nohup``) passes SIGINT on as ignored, and Python then never raises
    KeyboardInterrupt. Start the CLI as a terminal would, however pytest itself was started."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(ws: Path, *args: str, **env: str) -> subprocess.Popen:
    """``paperdag ARGS`` as its own process group (as a terminal would run it), output to a log."""
    log_path = ws / f"cli-{time.monotonic_ns()}.log"
    started_ms = int(time.time() * 1000)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=cli_env(ws, **env),
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_sigint_default)
    proc.log_path, proc.started_ms = log_path, started_ms
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")


def server_processes(parent_pid: int) -> list[int]:
    """Pids of the local Prefect servers a paperdag process started (their argv names the parent)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flows.prefect_server" in argv and str(parent_pid).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{output(proc)[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f":\n{output(proc)[-3000:]}" if proc else ""))


