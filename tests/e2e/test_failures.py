"""Bad input and crashes: a clear error, a non-zero exit, no half artifact, no MLflow run left RUNNING."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import EXIT_FAILED, EXIT_USAGE, main
from tests.helpers import mlflow_client

pytestmark = pytest.mark.e2e


def _runs(ws: Path):
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("nano")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _artifacts(ws: Path, kind: str) -> list[Path]:
    d = ws / "artifacts" / kind
    return sorted(p for p in d.iterdir()) if d.exists() else []


def _stage(*args) -> int:
    return main(["stage", "nano", *args, "--no-progress"])


def _assert_failed_cleanly(ws: Path, kind: str, stage: str) -> None:
    assert _artifacts(ws, kind) == [], f"a {kind} artifact (or temp dir) was left behind"
    runs = [r for r in _runs(ws) if r.data.tags.get("paperdag.stage") == stage]
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert all(r.info.status != "RUNNING" for r in _runs(ws))


def test_missing_data_file_is_refused_before_anything_runs(workspace, capsys):
    # a data file is an input of the digest, so a missing one fails when the recipe compiles
    missing = workspace / "nope.jsonl"
    rc = _stage("corpus", "--set", f"data.sources=[{{type: jsonl, path: {missing}}}]")
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(missing) in err and "data.sources[0].path" in err
    assert _artifacts(workspace, "corpus") == [] and _runs(workspace) == []


def test_empty_corpus_after_filtering(workspace, capsys):
    assert _stage("corpus") == 0
    rc = _stage("filter", "--set", "stages.filter.params={defaults: {min_words: 100000}, domain_overrides: {}}")
    assert rc == EXIT_FAILED
    assert "no training documents left after selection" in capsys.readouterr().err
    _assert_failed_cleanly(workspace, "select", "filter")


@pytest.fixture
def pretrained(workspace):
    for stage in ("corpus", "filter", "dedup", "tokenize", "pretrain_dense"):
        assert _stage(stage) == 0, stage
    return workspace


def test_corrupt_safetensors_is_detected(pretrained, capsys):
    [model_dir] = _artifacts(pretrained, "pretrain")
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _stage("quantize") == EXIT_FAILED
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "corrupt" in err and "paperdag run nano --only pretrain_dense" in err
    # the input is checked before the stage starts: no artifact, no run of it, nothing RUNNING
    assert _artifacts(pretrained, "quantize") == []
    assert all(r.info.status != "RUNNING" for r in _runs(pretrained))


def test_nan_loss_stops_the_stage_and_names_the_step(pretrained, capsys):
    rc = _stage("pretrain_spdf", "--set", "stages.pretrain_spdf.params.lr=1.0e+30")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step" in err
    runs = [r for r in _runs(pretrained) if r.data.tags.get("paperdag.stage") == "pretrain_spdf"]
    assert [r.info.status for r in runs] == ["FAILED"]
    assert len(_artifacts(pretrained, "pretrain")) == 1  # only pretrain_dense's


def test_quantization_aware_training_on_a_quantized_model_is_refused_before_anything_runs(workspace, capsys):
    # the recipe graph shows the input is a quantize stage: refused when it compiles, before the
    # stages upstream of it train (tests/tasks/test_train_checks.py covers the check at run time)
    rc = _stage("finetune_prose", "--set", "stages.finetune_prose.method=l4q", "--set",
                "stages.finetune_prose.inputs.model=quantize", "--set", "stages.finetune_prose.params.group_size=32")
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert ("stages.finetune_prose.inputs.model: method 'l4q' trains the weights onto a low-bit grid, but stage "
            "'quantize' is a quantize stage") in err and "Traceback" not in err
    assert _artifacts(workspace, "finetune") == [] and _runs(workspace) == []


def test_sigkill_mid_stage_leaves_no_partial_artifact_and_resumes(workspace):
    for stage in ("corpus", "filter", "dedup", "tokenize"):
        assert _stage(stage) == 0
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(workspace))
    cmd = [sys.executable, "-m", "flows.cli", "stage", "nano", "pretrain_dense", "--no-progress",
           "--set", "stages.pretrain_dense.params.steps=400", "--set", "stages.pretrain_dense.params.checkpoint_every=2"]
    log = open(workspace / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = workspace / ".paperdag" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not list(checkpoints.glob("*/step-*")):
        assert proc.poll() is None, (workspace / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in _artifacts(workspace, "pretrain") if not p.name.startswith(".tmp-")] == []
    # the killed process left its run RUNNING; the next tracker marks it KILLED
    rc = main(["stage", "nano", "pretrain_dense", "--no-progress",
               "--set", "stages.pretrain_dense.params.steps=400", "--set", "stages.pretrain_dense.params.checkpoint_every=2"])
    assert rc == 0
    [art] = _artifacts(workspace, "pretrain")  # the stale temp dir is gone too
    facts = json.loads((art / "paperdag.json").read_text())
    assert facts["resumed_from_step"] >= 2 and facts["steps"] == 400
    statuses = sorted(r.info.status for r in _runs(workspace) if r.data.tags.get("paperdag.stage") == "pretrain_dense")
    assert statuses == ["FINISHED", "KILLED"]
