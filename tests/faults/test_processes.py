"""Signals, kills at chosen points, races and a sick environment, on real CLI processes.

Default cases: Ctrl-C, a kill mid-checkpoint, two runs on a fresh workspace, a full disk, a
read-only workspace and an unreachable tracking server. Behind ``-m slow``: one that dies mid-training, SIGTERM, SIGKILL
of the CLI (its Prefect server must follow), the other kill points and kills at random times.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import EXIT_FAILED, main
from tests.faults.helpers import (
    artifact_dir,
    no_run_left_running,
    output,
    runs,
    server_processes,
    stage,
    start_cli,
    temp_dirs,
    wait_for,
)
from tests.helpers import NANO_RECIPE, free_port, make_workspace, mlflow_server

LONG_PRETRAIN = ("--set", "stages.pretrain_spdf.params.steps=100000", "--set",
                 "stages.pretrain_spdf.params.checkpoint_every=50")
SLOW_PRETRAIN = ("--set", "stages.pretrain_spdf.params.steps=1500", "--set",  # 15 ms a step here: 22 s
                 "stages.pretrain_spdf.params.checkpoint_every=50")


def _training_started(ws: Path) -> bool:
    return any(ws.glob(".paperdag/checkpoints/*/step-*"))


def _interrupt_run(ws: Path, sig: signal.Signals, to_group: bool) -> tuple[subprocess.Popen, float]:
    """Start `paperdag run nano` with a long SPDF pretraining, signal it once training is under way."""
    proc = start_cli(ws, "run", "nano", "--no-progress", *LONG_PRETRAIN)
    wait_for(lambda: _training_started(ws) and server_processes(proc.pid), 240, "training to start", proc)
    sent = time.monotonic()
    os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc, time.monotonic() - sent


def _killed_cleanly(ws: Path, proc: subprocess.Popen) -> None:
    interrupted = [r for r in runs(ws) if r.data.tags.get("paperdag.stage") == "pretrain_spdf"
                   and r.data.tags.get("paperdag.cache") == "miss" and r.info.start_time > proc.started_ms]
    assert [r.info.status for r in interrupted] == ["KILLED"]
    assert no_run_left_running(ws)
    assert server_processes(proc.pid) == []
    assert temp_dirs(ws) == [] and len(list(ws.glob("artifacts/pretrain/*"))) == 2  # no third, half-made one


@pytest.mark.fault("clear_error")
def test_ctrl_c_stops_within_5s_with_rc_130(nano_copy):
    """Ctrl-C hung 73 s and exited 1 with ConnectError, leaving the Prefect server running."""
    proc, seconds = _interrupt_run(nano_copy, signal.SIGINT, to_group=True)  # as a terminal sends it
    out = output(proc)
    assert proc.returncode == 130 and seconds < 5, (proc.returncode, seconds, out[-2000:])
    assert "interrupted (SIGINT)" in out and "Traceback" not in out and "ConnectError" not in out
    _killed_cleanly(nano_copy, proc)


@pytest.mark.slow
@pytest.mark.fault("clear_error")
def test_sigterm_stops_within_5s_with_rc_143(nano_copy):
    proc, seconds = _interrupt_run(nano_copy, signal.SIGTERM, to_group=False)
    out = output(proc)
    assert proc.returncode == 143 and seconds < 5, (proc.returncode, seconds, out[-2000:])
    assert "interrupted (SIGTERM)" in out and "Traceback" not in out
    _killed_cleanly(nano_copy, proc)


@pytest.mark.slow
@pytest.mark.fault("recovers")
def test_sigkill_of_the_cli_takes_its_prefect_server_with_it(nano_copy):
    """After SIGKILL the ephemeral server used to keep running for minutes."""
    proc = start_cli(nano_copy, "run", "nano", "--no-progress", *LONG_PRETRAIN)
    wait_for(lambda: _training_started(nano_copy) and server_processes(proc.pid), 240, "training to start", proc)
    [server] = server_processes(proc.pid)
    proc.kill()
    proc.wait()
    wait_for(lambda: not Path(f"/proc/{server}").exists() or b"Z" in _state(server), 3, "the server to exit")
    # the killed run is swept KILLED by the next command, which resumes from the checkpoint
    assert stage(nano_copy, "corpus") == 0 and no_run_left_running(nano_copy)


def _rank_processes() -> list[str]:
    done = subprocess.run(["pgrep", "-f", "tasks.train_ranks"], capture_output=True, text=True)
    return done.stdout.split()


@pytest.mark.slow
@pytest.mark.fault("clear_error")
def test_ctrl_c_during_a_two_rank_stage_stops_every_rank_and_the_rerun_resumes(nano_copy):
    """The ranks run in their own session (a terminal's Ctrl-C reaches only the CLI), so the task
    must stop them: none may outlive the CLI, and the next run resumes from rank 0's checkpoint."""
    args = ("--set", "stages.pretrain_dense.resources.ranks=2", "--set", "stages.pretrain_dense.params.steps=1500",
            "--set", "stages.pretrain_dense.params.checkpoint_every=20")
    proc = start_cli(nano_copy, "run", "nano", "--only", "pretrain_dense", "--no-progress", *args)
    wait_for(lambda: _training_started(nano_copy) and len(_rank_processes()) >= 2, 300, "two ranks to train", proc)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    out = output(proc)
    assert proc.returncode == 130 and time.monotonic() - sent < 10, (proc.returncode, out[-2000:])
    wait_for(lambda: not _rank_processes(), 5, "the ranks to exit")
    assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []
    assert not list(nano_copy.glob(".paperdag/ranks/*"))
    assert main(["--workspace", str(nano_copy), "run", "nano", "--only", "pretrain_dense", "--no-progress",
                 *args]) == 0
    [facts] = [f for f in (json.loads(p.read_text()) for p in nano_copy.glob("artifacts/pretrain/*/paperdag.json"))
               if f.get("ranks") == 2]
    assert facts["resumed_from_step"] > 0 and facts["steps"] == 1500


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().split(b")")[-1][:3]
    except OSError:
        return b"Z"


KILL_POINTS = ["checkpoint-write", "artifact-rename", "mlflow-log"]


def _kill_at(ws: Path, point: str, *args: str) -> subprocess.Popen:
    proc = start_cli(ws, "stage", "nano", "pretrain_dense", "--no-progress", *args, PAPERDAG_FAILPOINT=point)
    proc.wait(timeout=300)
    return proc


@pytest.mark.parametrize("point", [pytest.param(p, marks=[pytest.mark.fault("recovers")] +
                                                ([] if p == "checkpoint-write" else [pytest.mark.slow]))
                                   for p in KILL_POINTS])
def test_a_kill_at_each_point_loses_nothing_and_the_rerun_is_identical(nano_copy, point):
    reference = (artifact_dir(nano_copy, "pretrain_dense") / "model.safetensors").read_bytes()
    args = ("--set", "stages.pretrain_dense.params.checkpoint_every=3")  # a new digest: trains from scratch
    proc = _kill_at(nano_copy, point, *args)
    assert proc.returncode == -signal.SIGKILL, output(proc)[-2000:]
    complete = [p for p in nano_copy.glob("artifacts/pretrain/*") if not p.name.startswith(".tmp-")]
    assert len(complete) == 3 if point == "mlflow-log" else len(complete) == 2  # the new one only once whole
    assert stage(nano_copy, "pretrain_dense", *args) == 0
    rebuilt = max(nano_copy.glob("artifacts/pretrain/*/manifest.json"), key=lambda p: p.stat().st_mtime).parent
    assert (rebuilt / "model.safetensors").read_bytes() == reference  # checkpoint_every does not change training
    assert temp_dirs(nano_copy) == [] and no_run_left_running(nano_copy)
    assert main(["--workspace", str(nano_copy), "verify", rebuilt.name]) == 0
    statuses = sorted(r.info.status for r in runs(nano_copy) if r.data.tags.get("paperdag.artifact_digest", "")
                      .startswith(rebuilt.name))
    assert statuses == ["FINISHED", "KILLED"]


@pytest.mark.slow
@pytest.mark.fault("recovers")
def test_kills_at_random_moments_still_end_bit_identical(nano_copy):
    steps = ("--set", "stages.pretrain_dense.params.steps=400")
    assert stage(nano_copy, "pretrain_dense", *steps) == 0  # the uninterrupted reference
    reference = max(nano_copy.glob("artifacts/pretrain/*/manifest.json"), key=lambda p: p.stat().st_mtime).parent
    args = (*steps, "--set", "stages.pretrain_dense.params.checkpoint_every=7")
    rng = random.Random(0)
    for _ in range(4):
        proc = start_cli(nano_copy, "stage", "nano", "pretrain_dense", "--no-progress", *args)
        wait_for(lambda: any(nano_copy.glob(".paperdag/checkpoints/*/*step-*")) or proc.poll() is not None, 240,
                 "training to start")
        time.sleep(rng.uniform(0.0, 3.0))  # somewhere in a step, a checkpoint write, or MLflow logging
        proc.kill()
        proc.wait()
    assert stage(nano_copy, "pretrain_dense", *args) == 0
    rebuilt = max(nano_copy.glob("artifacts/pretrain/*/manifest.json"), key=lambda p: p.stat().st_mtime).parent
    assert rebuilt != reference
    assert (rebuilt / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert temp_dirs(nano_copy) == [] and no_run_left_running(nano_copy)


TINY = ("corpus", "filter", "dedup", "tokenize", "pretrain_dense")


@pytest.mark.fault("recovers")
def test_two_runs_started_together_on_a_fresh_workspace(tmp_path):
    """Both raced on creating mlflow.db (alembic CommandError / "table already exists", 2 of 2)."""
    ws = make_workspace(tmp_path / "ws", {})
    recipe = yaml.safe_load(NANO_RECIPE.read_text())
    recipe["stages"] = {k: v for k, v in recipe["stages"].items() if k in TINY}
    recipe["claims"] = []
    (ws / "params" / "nano.yaml").write_text(yaml.safe_dump(recipe))
    procs = [start_cli(ws, "run", "nano", "--no-progress") for _ in range(2)]
    for proc in procs:
        proc.wait(timeout=400)
    outs = [output(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-2000:] for o in outs)
    for out in outs:
        assert "Traceback" not in out and "already exists" not in out and "CommandError" not in out
    # each stage was built once: one artifact per stage, and the two runs hit or waited for each other
    assert sorted(len(list(ws.glob(f"artifacts/{k}/*"))) for k in ("corpus", "select", "tokenize", "pretrain")) == \
        [1, 1, 1, 2]
    hits = [int(re.search(r"(\d+) cache hits", o).group(1)) for o in outs]
    assert sum(hits) == len(TINY)  # every stage: built by one run, a hit for the other
    assert no_run_left_running(ws)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_mount
@pytest.mark.fault("clear_error")
def test_a_full_disk_is_named_in_one_line_and_nothing_is_left_running(tmp_path, capsys):
    """ENOSPC gave `RuntimeError: [enforce fail at inline_container.cc:672]` and left 2 runs RUNNING."""
    ws = tmp_path / "small"
    if not _mount_tmpfs(ws, "8m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_workspace(ws)
        for name in ("corpus", "filter", "dedup", "tokenize"):
            assert stage(ws, name) == 0
        capsys.readouterr()
        assert stage(ws, "pretrain_dense") == EXIT_FAILED  # its checkpoints fill the 8 MB
        err = capsys.readouterr().err
        assert "failed: disk full: no space left on the device holding" in err and len(err.strip().splitlines()) == 1
        assert no_run_left_running(ws) and temp_dirs(ws) == [] and not list(ws.glob("artifacts/pretrain/*"))
        assert [r.info.status for r in runs(ws) if r.data.tags.get("paperdag.stage") == "pretrain_dense"] == ["FAILED"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(ws)], check=True)
        assert stage(ws, "pretrain_dense") == 0  # room again: it resumes and completes
        assert main(["--workspace", str(ws), "verify"]) == 0
    finally:
        subprocess.run(["umount", "-l", str(ws)], capture_output=True)


@needs_mount
@pytest.mark.fault("clear_error")
def test_a_read_only_workspace_fails_in_one_line_within_10s(tmp_path):
    """A read-only workspace timed out after 131 s with 74 tracebacks."""
    ws = tmp_path / "ro"
    if not _mount_tmpfs(ws, "4m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_workspace(ws)
        subprocess.run(["mount", "-o", "remount,ro", str(ws)], check=True)
        started = time.monotonic()
        proc = start_cli(tmp_path, "--workspace", str(ws), "run", "nano")
        proc.wait(timeout=60)
        seconds = time.monotonic() - started
        out = output(proc)
        assert proc.returncode == EXIT_FAILED and seconds < 10, (seconds, out)
        assert out.strip().splitlines() == [f"error: workspace {ws} is not writable: Read-only file system ({ws}); "
                                            "paperdag keeps its artifacts and state there. Fix its permissions or "
                                            "pass --workspace DIR"]
    finally:
        subprocess.run(["umount", "-l", str(ws)], capture_output=True)


@pytest.mark.fault("clear_error")
def test_an_unreachable_tracking_server_is_named_within_10s(tmp_path, monkeypatch, capsys):
    """An unreachable MLFLOW_TRACKING_URI retried for 267 s."""
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.monotonic()
    assert main(["--workspace", str(ws), "run", "nano"]) == EXIT_FAILED
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: MLflow tracking server http://127.0.0.1:9 is unreachable ([Errno 111] "
                                        "Connection refused); start it, or unset MLFLOW_TRACKING_URI to track in "
                                        "the workspace's SQLite file"]
    assert not list(ws.glob("artifacts/*/*"))


@pytest.mark.slow  # two mlflow servers and two nano runs: ~2.5 min on 2 cores, over the default suite's budget
@pytest.mark.fault("recovers")
def test_a_tracking_server_that_dies_mid_training_costs_no_compute_and_leaves_no_run_running(nano_copy, tmp_path):
    """The MLflow server stops while a stage trains and stays down: the training finishes and its
    artifact is kept, the error names the server, and once it is back the runs get their real
    end (from the journal, not the orphan check's KILLED) and the rerun does not train again."""
    from mlflow.tracking import MlflowClient

    port, state = free_port(), tmp_path / "server"
    run_args = ("run", "nano", "--no-progress", *SLOW_PRETRAIN)
    with mlflow_server(state, port) as url:
        proc = start_cli(nano_copy, *run_args, MLFLOW_TRACKING_URI=url,
                         PREFECT_LOGGING_LEVEL="CRITICAL")  # the CLI's own default; the test session's is WARNING
        wait_for(lambda: _training_started(nano_copy), 240, "training to start", proc)
    stopped = time.monotonic()  # the server is down from here
    proc.wait(timeout=600)
    out = output(proc)
    assert proc.returncode == EXIT_FAILED, out
    assert _training_started(nano_copy) is False  # training ran to its end: its checkpoints are cleaned up
    assert f"warning: MLflow tracking server {url} stopped answering" in out  # the step logs, once
    assert f"error: stage pretrain_spdf (pretrain/spdf) failed: MLflow tracking server {url} stopped answering" in out
    assert "Traceback" not in out
    assert temp_dirs(nano_copy) == [] and len(list(nano_copy.glob("artifacts/pretrain/*"))) == 3  # the new one kept
    journal = nano_copy / ".paperdag" / "tracking-journal.jsonl"
    assert len(journal.read_text().splitlines()) == 2  # the stage's run and the flow's run
    assert time.monotonic() - stopped < 300

    with mlflow_server(state, port) as url:
        rerun = start_cli(nano_copy, *run_args, MLFLOW_TRACKING_URI=url)
        rerun.wait(timeout=600)
        assert rerun.returncode == 0, output(rerun)
        assert re.search(r"pretrain_spdf .* cached in", output(rerun)), output(rerun)
        client = MlflowClient(url)
        tracked = client.search_runs([client.get_experiment_by_name("nano").experiment_id], max_results=1000)
    assert all(r.info.status != "RUNNING" for r in tracked)
    [trained] = [r for r in tracked if r.data.tags.get("paperdag.stage") == "pretrain_spdf"
                 and r.data.tags.get("paperdag.cache") == "miss"]
    assert trained.info.status == "FAILED"
    assert trained.data.tags["paperdag.error"].startswith(f"TrackingServerError: MLflow tracking server {url} stopped")
    [flow] = [r for r in tracked if r.data.tags.get("paperdag.role") == "flow" and r.info.status != "FINISHED"]
    assert flow.info.status == "FAILED"
    assert flow.data.tags["paperdag.error"].startswith("StageFailedError: stage pretrain_spdf")
    assert journal.read_text() == ""


@pytest.mark.fault("recovers")
def test_four_processes_create_one_mlflow_store_at_once(tmp_path):
    code = ("import sys; from tasks.tracking import Tracker; from tasks.workspace import Workspace; "
            "Tracker(Workspace.from_env(sys.argv[1]), sys.argv[2])")
    ws = make_workspace(tmp_path / "ws")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ws), f"exp{i % 2}"], stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(e[-1500:] for e in errors)
    from tests.helpers import mlflow_client

    names = sorted(e.name for e in mlflow_client(ws).search_experiments())
    assert names == ["Default", "exp0", "exp1"]
