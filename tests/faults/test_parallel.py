"""`paperdag run --max-parallel N`: stages side by side on real Prefect task runners (worker
processes; behind `-m slow`, a Dask LocalCluster, a local Ray and a worker killed mid-stage), on copies of the
nano workspace."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flows.cli import EXIT_FAILED, EXIT_USAGE, main
from flows.recipe import load_plan
from tasks.artifacts import DIGEST_LEN
from tests.faults.helpers import (
    no_run_left_running,
    output,
    runs,
    start_cli,
    temp_dirs,
    wait_for,
)
from tests.helpers import free_port

BOTH_PRETRAINS = ("--only", "pretrain_dense", "--only", "pretrain_spdf")


def _stage_runs(ws, started_after_ms: int) -> dict[str, object]:
    return {r.data.tags["paperdag.stage"]: r for r in runs(ws)
            if "paperdag.stage" in r.data.tags and r.info.start_time >= started_after_ms}


def _run(ws, *args: str, timeout: float = 600):
    # Prefect's logging as in a user's shell (the suite sets WARNING, which logs each failed task's traceback)
    proc = start_cli(ws, "run", "nano", "--no-progress", *args, PREFECT_LOGGING_LEVEL="CRITICAL")
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its workers too: a hung run must not outlive the test
        raise
    return proc, output(proc)


# slow on every runner: 54 s on the process runner on a 2-core Intel Xeon at 226fb9a, where the default
# suite ran 918 s, over its budget. The process runner's own faults stay in the default suite below.
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["process", "dask", "ray"])
@pytest.mark.fault("recovers")
def test_two_independent_stages_overlap_and_build_the_same_bytes_as_one_after_another(nano_copy, runner):
    """Both pretraining stages read only the tokens: submitted together, they train in two
    worker processes at once (150 steps each, so the workers' start-up cannot hide the overlap),
    and the masked one writes the bytes that a build in this process writes (rebuilding both
    would add a minute to the default suite; the --from test below checks every rebuilt model's
    bytes on this runner)."""
    if runner == "ray":
        pytest.importorskip("prefect_ray", reason="pip install -e '.[ray]'")
    longer = [a for name in ("pretrain_dense", "pretrain_spdf") for a in
              ("--set", f"stages.{name}.params.steps=150", "--set", f"stages.{name}.params.checkpoint_every=50")]
    proc, out = _run(nano_copy, "--max-parallel", "2", "--runner", runner, *BOTH_PRETRAINS, *longer)
    assert proc.returncode == 0, out[-3000:]
    assert out.count(" started\n") == 2 and out.count("done in") == 2
    assert "critical path: pretrain_" in out  # the two pretrains ran: the report names the longer
    stage_runs = _stage_runs(nano_copy, proc.started_ms)
    dense, spdf = stage_runs["pretrain_dense"].info, stage_runs["pretrain_spdf"].info
    assert dense.status == spdf.status == "FINISHED"
    assert dense.start_time < spdf.end_time and spdf.start_time < dense.end_time, "the two stages did not overlap"
    assert len({stage_runs[n].data.tags["paperdag.pid"] for n in ("pretrain_dense", "pretrain_spdf")}) == 2
    parent = {r.data.tags.get("mlflow.parentRunId") for r in stage_runs.values()}
    assert len(parent) == 1 and None not in parent  # one flow run owns both
    assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []

    digest = stage_runs["pretrain_spdf"].data.tags["paperdag.artifact_digest"]
    [built] = nano_copy.glob(f"artifacts/pretrain/{digest[:16]}")
    side_by_side = (built / "model.safetensors").read_bytes()
    assert main(["--workspace", str(nano_copy), "stage", "nano", "pretrain_spdf", "--force", "--no-progress",
                 "--no-track", *longer]) == 0
    assert (built / "model.safetensors").read_bytes() == side_by_side


@pytest.mark.slow  # 34 s on a 2-core Intel Xeon at 774b52a, where the default suite ran 912 s, over its budget
@pytest.mark.fault("recovers")
def test_stages_that_each_ask_for_every_core_run_one_after_another(nano_copy):
    """The same two independent pretraining stages as above, each declaring ``resources.threads``
    equal to the machine's cores: --max-parallel 2 could start both, the packer starts one at a
    time (the test above is the control: without resources they overlap)."""
    cores = os.cpu_count()
    args = [a for name in ("pretrain_dense", "pretrain_spdf") for a in
            ("--set", f"stages.{name}.params.steps=10", "--set", f"stages.{name}.resources={{threads: {cores}}}")]
    proc, out = _run(nano_copy, "--max-parallel", "2", *BOTH_PRETRAINS, *args)
    assert proc.returncode == 0, out[-3000:]
    stage_runs = _stage_runs(nano_copy, proc.started_ms)
    dense, spdf = stage_runs["pretrain_dense"].info, stage_runs["pretrain_spdf"].info
    assert dense.status == spdf.status == "FINISHED"
    assert dense.end_time <= spdf.start_time or spdf.end_time <= dense.start_time, "the two stages overlapped"


@pytest.mark.slow  # 43 s there; `--from` itself stays in the default suite (tests/e2e/test_pipeline.py)
@pytest.mark.fault("recovers")
def test_from_on_the_parallel_runner_reruns_exactly_the_stage_and_its_downstream_with_the_same_bytes(nano_copy):
    """`--from pretrain_dense --max-parallel 2` on the process runner recomputes pretrain_dense and
    everything that reads it, and serves the rest from the cache; every rebuilt model has the bytes
    the one-after-another build wrote. (Nano's stages are too short to be sure two of them overlap:
    a second worker may still be importing torch when the first is done; the overlap itself is
    tested above with 150-step pretrains.)"""
    _, plan = load_plan(nano_copy / "params" / "nano.yaml")
    downstream = {"pretrain_dense"}
    for name, stage in plan.stages.items():  # plan order is topological
        if downstream & set(stage.upstream):
            downstream.add(name)
    assert {"finetune_prose", "finetune_code", "merge", "evaluate"} <= downstream
    before = {p: p.read_bytes() for p in nano_copy.glob("artifacts/*/*/model.safetensors")}
    proc, out = _run(nano_copy, "--max-parallel", "2", "--from", "pretrain_dense")
    assert proc.returncode == 0, out[-3000:]
    stage_runs = _stage_runs(nano_copy, proc.started_ms)
    rebuilt = {n for n, r in stage_runs.items() if r.data.tags["paperdag.cache"] == "miss"}
    assert rebuilt == downstream and set(stage_runs) == set(plan.stages)
    assert {p: p.read_bytes() for p in nano_copy.glob("artifacts/*/*/model.safetensors")} == before
    assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []


@pytest.mark.fault("clear_error")
def test_a_failing_stage_stops_new_ones_while_its_sibling_finishes_and_stays_cached(nano_copy, capsys):
    """finetune_code diverges (lr 1e30) while finetune_prose, beside it, completes: the run
    exits 1 naming finetune_code; finetune_prose's new artifact is in place and is a cache hit
    on the next run; merge and evaluate (downstream) never started; nothing is left RUNNING."""
    finetunes_before = set(nano_copy.glob("artifacts/finetune/*"))
    args = ("--max-parallel", "2", "--only", "finetune_prose", "--only", "finetune_code",
            "--set", "stages.finetune_code.params.lr=1e30", "--set", "stages.finetune_prose.params.steps=5")
    proc, out = _run(nano_copy, *args)
    assert proc.returncode == EXIT_FAILED, out[-3000:]
    assert "error: stage finetune_code (finetune/dense) failed" in out and "Traceback" not in out
    stage_runs = _stage_runs(nano_copy, proc.started_ms)
    assert stage_runs["finetune_code"].info.status == "FAILED"
    assert stage_runs["finetune_prose"].info.status == "FINISHED"
    assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []
    [new] = set(nano_copy.glob("artifacts/finetune/*")) - finetunes_before  # prose's; none of code's
    assert stage_runs["finetune_prose"].data.tags["paperdag.artifact_digest"].startswith(new.name)
    assert not {"merge", "evaluate"} & set(stage_runs)
    # with the same settings, finetune_prose's artifact is in the cache and finetune_code's is not
    assert main(["--workspace", str(nano_copy), "status", "nano", "--json", *args[2:]]) == 0
    cached = {row["stage"]: row["cached"] for row in json.loads(capsys.readouterr().out)["stages"]}
    assert cached["finetune_prose"] and not cached["finetune_code"]


@pytest.mark.fault("clear_error")
def test_ctrl_c_during_parallel_stages_kills_the_workers_and_marks_both_runs_killed(nano_copy):
    long = ("--set", "stages.pretrain_dense.params.steps=100000", "--set", "stages.pretrain_spdf.params.steps=100000",
            "--set", "stages.pretrain_dense.params.checkpoint_every=50",
            "--set", "stages.pretrain_spdf.params.checkpoint_every=50")
    proc = start_cli(nano_copy, "run", "nano", "--no-progress", "--max-parallel", "2", *BOTH_PRETRAINS, *long)
    # a checkpoint of each stage (two of one could come before the other has started)
    wait_for(lambda: len({p.parent for p in nano_copy.glob(".paperdag/checkpoints/*/step-*")}) >= 2, 300,
             "both to train", proc)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds, out = time.monotonic() - sent, output(proc)
    assert proc.returncode == 130 and seconds < 15, (proc.returncode, seconds, out[-2000:])
    assert "interrupted (SIGINT)" in out and "Traceback" not in out
    stage_runs = _stage_runs(nano_copy, proc.started_ms)
    assert {stage_runs[n].info.status for n in ("pretrain_dense", "pretrain_spdf")} == {"KILLED"}
    assert no_run_left_running(nano_copy)
    wait_for(lambda: temp_dirs(nano_copy) == [], 10, "the workers' temp dirs to go")
    wait_for(lambda: not _processes_in_group(proc.pid), 10, "every worker process to exit")


@pytest.mark.slow  # two runs and a rebuild: ~2.5 min on 2 cores, over the default suite's budget
@pytest.mark.fault("recovers")
def test_a_worker_killed_mid_stage_is_named_and_the_rerun_resumes_from_its_checkpoint(nano_copy):
    """SIGKILL of the worker process training pretrain_spdf (an OOM kill, a node lost): the run
    stops with an error, nothing is left RUNNING once the next run opens the store, and that run
    resumes the stage from its last checkpoint and ends with the bytes of an uninterrupted build."""
    args = ("--max-parallel", "2", *BOTH_PRETRAINS, *[
        a for name in ("pretrain_dense", "pretrain_spdf") for a in
        ("--set", f"stages.{name}.params.steps=600", "--set", f"stages.{name}.params.checkpoint_every=50")])
    _, plan = load_plan(nano_copy / "params" / "nano.yaml", [a for a in args[6:] if a != "--set"])
    spdf_checkpoints = nano_copy / ".paperdag" / "checkpoints" / plan.stages["pretrain_spdf"].digest[:DIGEST_LEN]
    proc = start_cli(nano_copy, "run", "nano", "--no-progress", *args, PREFECT_LOGGING_LEVEL="CRITICAL")

    def spdf_worker() -> int | None:
        run = _stage_runs(nano_copy, proc.started_ms).get("pretrain_spdf")
        return int(run.data.tags["paperdag.pid"]) if run is not None and run.info.status == "RUNNING" else None

    # its own checkpoint, not just any: pretrain_dense, beside it, may have written several by then
    wait_for(lambda: spdf_worker() and any(spdf_checkpoints.glob("step-*")), 300, "pretrain_spdf to checkpoint", proc)
    os.kill(spdf_worker(), signal.SIGKILL)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = output(proc)
    assert proc.returncode == EXIT_FAILED, out[-3000:]
    # pretrain_dense, beside it, may have finished first; if not, the broken pool took it down too
    assert re.search(r"error: a worker process died while running stages? (pretrain_dense, )?pretrain_spdf "
                     r"\(BrokenProcessPool: killed by a signal, or out of memory\?\); (its|their) checkpoints are kept",
                     out), out[-3000:]
    assert "Traceback" not in out
    assert any(spdf_checkpoints.glob("step-*"))  # what it had trained is still there

    rerun, out = _run(nano_copy, *args)
    assert rerun.returncode == 0, out[-3000:]
    assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []
    stage_runs = _stage_runs(nano_copy, rerun.started_ms)
    digest = stage_runs["pretrain_spdf"].data.tags["paperdag.artifact_digest"]
    [built] = nano_copy.glob(f"artifacts/pretrain/{digest[:16]}")
    facts = json.loads((built / "paperdag.json").read_text())
    assert 0 < facts["resumed_from_step"] < 600, facts
    resumed = (built / "model.safetensors").read_bytes()
    assert main(["--workspace", str(nano_copy), "stage", "nano", "pretrain_spdf", "--force", "--no-progress",
                 "--no-track", *args[6:]]) == 0
    assert (built / "model.safetensors").read_bytes() == resumed


@pytest.mark.slow  # a Ray head node starts in ~15 s here, then two workers import torch
@pytest.mark.fault("recovers")
def test_stages_run_on_a_ray_cluster_at_its_address(nano_copy):
    """`--runner ray:ADDRESS` on a Ray head started apart from paperdag (`ray start --head` on
    loopback, as on a cluster): both stages run in Ray's worker processes, not the CLI's, each
    holding its threads as Ray CPUs; a stage asking for more CPUs than any node has is refused."""
    pytest.importorskip("prefect_ray", reason="pip install -e '.[ray]'")
    port, ray = free_port(), str(Path(sys.executable).with_name("ray"))  # the venv's CLI
    # the cluster's token, given to paperdag as a cluster's users get it (Ray >= 2.5x authenticates clients)
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **token)
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    started = subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                              "--temp-dir", temp], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        # a stage no node can hold is refused before anything is submitted (Ray would keep it pending)
        refused = start_cli(nano_copy, "run", "nano", "--no-progress", "--max-parallel", "2", "--runner",
                            f"ray:127.0.0.1:{port}", *BOTH_PRETRAINS, "--set", "stages.pretrain_dense.resources.threads=3",
                            PREFECT_LOGGING_LEVEL="CRITICAL", **token)
        refused.wait(timeout=300)
        assert refused.returncode == EXIT_USAGE, output(refused)[-3000:]
        assert ("stages.pretrain_dense.resources: asks Ray for CPU 3 on one node, but the cluster's largest node has "
                "CPU 2 (1 node(s))") in output(refused)
        longer = [a for name in ("pretrain_dense", "pretrain_spdf") for a in ("--set", f"stages.{name}.params.steps=40")]
        proc = start_cli(nano_copy, "run", "nano", "--no-progress", "--max-parallel", "2", "--runner",
                         f"ray:127.0.0.1:{port}", *BOTH_PRETRAINS, *longer, PREFECT_LOGGING_LEVEL="CRITICAL", **token)
        proc.wait(timeout=600)
        assert proc.returncode == 0, output(proc)[-3000:]
        stage_runs = _stage_runs(nano_copy, proc.started_ms)
        assert {stage_runs[n].info.status for n in ("pretrain_dense", "pretrain_spdf")} == {"FINISHED"}
        pids = {int(stage_runs[n].data.tags["paperdag.pid"]) for n in ("pretrain_dense", "pretrain_spdf")}
        assert proc.pid not in pids
        assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _processes_in_group(pgid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(("args", "message"), [
    (("--runner", "kubernetes", "--max-parallel", "2"), "expected process, dask[:ADDRESS] or ray[:ADDRESS]"),
    (("--runner", "dask"), "give --max-parallel N, N > 1"),
    (("--runner", "process:tcp://host:1", "--max-parallel", "2"), "takes no address"),
])
@pytest.mark.fault("clear_error")
def test_a_runner_spec_that_cannot_work_is_refused_before_anything_runs(nano_copy, capsys, args, message):
    before = sorted(nano_copy.glob("artifacts/*/*"))
    rc = main(["--workspace", str(nano_copy), "run", "nano", "--max-parallel", "1", *args]
              if "--max-parallel" not in args else ["--workspace", str(nano_copy), "run", "nano", *args])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and message in err, err
    assert sorted(nano_copy.glob("artifacts/*/*")) == before


@pytest.mark.fault("clear_error")
def test_a_dask_scheduler_that_does_not_answer_is_named_in_seconds(nano_copy, capsys):
    pytest.importorskip("prefect_dask")
    port = free_port()  # its socket is closed on return: nothing listens there
    start = time.monotonic()
    rc = main(["--workspace", str(nano_copy), "run", "nano", "--max-parallel", "2", "--runner",
               f"dask:tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and f"127.0.0.1:{port} does not answer" in err, err
    assert time.monotonic() - start < 30


def test_max_parallel_must_be_a_positive_whole_number(nano_copy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--workspace", str(nano_copy), "run", "nano", "--max-parallel", "0"])
    assert exit_info.value.code == EXIT_USAGE
    assert "expected a whole number of stages, 1 or more, got '0'" in capsys.readouterr().err


@pytest.mark.slow  # about 50 s here: two worker processes start torch
def test_a_flow_on_threads_runs_its_stages_on_worker_processes_of_its_own(nano_copy):
    """A deployment's flow (`paperdag serve`/`deploy --max-parallel 2`) starts from its entrypoint
    on Prefect's thread runner, where stages would share torch's RNG: given max_parallel=2, its two
    independent pretraining stages run on a process runner of its own, in worker processes (not
    this one), and write the bytes that `paperdag run --max-parallel 2` writes. (That they overlap
    is the test above's; here only where they run.)"""
    from flows.cli import _prefect_api
    from flows.pipeline import recipe_flow
    from tasks.workspace import Workspace

    ws = Workspace.from_env(str(nano_copy))
    ws.configure_environment()
    started_ms = int(time.time() * 1000)
    with _prefect_api(ws):
        summary = recipe_flow("nano", workspace=str(nano_copy), max_parallel=2,
                              only=["pretrain_dense", "pretrain_spdf"], progress=False)
    assert sorted(o.name for o in summary.outcomes if not o.cached) == ["pretrain_dense", "pretrain_spdf"]
    stage_runs = _stage_runs(nano_copy, started_ms)
    assert [stage_runs[n].info.status for n in ("pretrain_dense", "pretrain_spdf")] == ["FINISHED"] * 2
    pids = {stage_runs[n].data.tags["paperdag.pid"] for n in ("pretrain_dense", "pretrain_spdf")}
    assert str(os.getpid()) not in pids, "a stage ran in the flow's own process"
    assert no_run_left_running(nano_copy) and temp_dirs(nano_copy) == []
