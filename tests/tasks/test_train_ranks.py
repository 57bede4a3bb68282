"""The multi-rank launcher's plumbing: its command lines, the metrics it forwards while ranks
train, how a rank's error comes back under the stage's name, and what a failing launch prints.
(tests/components/train/test_trainer_ranks.py and the e2e test train on real ranks.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from components.train.trainer import NonFiniteLossError
from tasks.train_ranks import LAUNCH_FLAG, RANK_ENV, RankFailedError, _forward_metrics, _rank_error, launcher_command
from tests.helpers import REPO


def test_one_machine_uses_torchrun_and_a_hostfile_the_deepspeed_launcher(tmp_path):
    spec = tmp_path / "spec.json"
    assert launcher_command(spec, 4) == [sys.executable, "-m", "tasks.train_ranks", LAUNCH_FLAG, "--standalone",
                                         "--nnodes", "1", "--nproc_per_node", "4", "-m", "tasks.train_ranks", str(spec)]
    assert launcher_command(spec, 8, "/etc/hosts.ds") == [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", "/etc/hosts.ds", "--num_gpus", "8",
        "--module", "tasks.train_ranks", str(spec)]


def test_only_complete_metric_lines_are_forwarded_once(tmp_path):
    """Rank 0 may be mid-line when the task looks; that line waits for the next look."""
    path, seen = tmp_path / "metrics.jsonl", []
    log = lambda step, metrics: seen.append((step, metrics))  # noqa: E731
    assert _forward_metrics(path, 0, log) == 0  # rank 0 has not started writing
    path.write_text(json.dumps({"step": 4, "metrics": {"loss": 3.0}}) + "\n" + '{"step": 8, "met')
    done = _forward_metrics(path, 0, log)
    path.write_text(path.read_text() + 'rics": {"loss": 2.5}}\n')
    _forward_metrics(path, done, log)
    assert seen == [(4, {"loss": 3.0}), (8, {"loss": 2.5})]


@pytest.mark.parametrize(("kind", "raised"), [("NonFiniteLossError", NonFiniteLossError), ("ValueError", ValueError),
                                              ("OSError", RankFailedError)])
def test_a_rank_error_comes_back_as_the_type_one_rank_would_raise(tmp_path, kind, raised):
    (tmp_path / "error-rank1.json").write_text(json.dumps({"type": kind, "message": "non-finite loss (nan) at step 3"}))
    error = _rank_error(tmp_path, "pretrain_dense", 2, 1)
    assert type(error) is raised
    assert str(error) == "stage pretrain_dense: rank 1 of 2: non-finite loss (nan) at step 3"


def test_a_launcher_that_dies_before_any_rank_reports_says_so(tmp_path):
    error = _rank_error(tmp_path, "pretrain_dense", 2, 137)
    assert isinstance(error, RankFailedError) and "exited with code 137 before any rank reported" in str(error)


def _launch_broken(tmp_path, handoff) -> subprocess.CompletedProcess:
    """Two real ranks (under torchrun's agent) whose stage input does not exist."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "stage": "pretrain_dense", "kind": "pretrain", "method": "dense",
        "method_class": "components.train.dense:DenseTraining", "params": {}, "options": {},
        "inputs": {"tokens": str(tmp_path / "no_such_artifact")}, "checkpoints": str(tmp_path / "checkpoints"),
        "progress": False, "threads": 1, "handoff": str(handoff)}))
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    return subprocess.run(launcher_command(spec, 2), env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_a_failing_launch_prints_nothing_and_the_task_raises_one_error_with_its_traceback(tmp_path):
    done = _launch_broken(tmp_path, tmp_path)
    assert done.returncode != 0
    assert done.stdout == "" and done.stderr == ""  # was ~200 lines: two rank tracebacks and torchrun's report
    error = _rank_error(tmp_path, "pretrain_dense", 2, done.returncode)
    assert str(error).startswith("stage pretrain_dense: rank 0 of 2: ") and "no_such_artifact" in str(error)
    [note] = error.__notes__
    assert note.startswith("rank 0's traceback:\nTraceback (most recent call last):")


def test_a_launch_where_no_rank_could_report_keeps_torchruns_report(tmp_path):
    done = _launch_broken(tmp_path, tmp_path / "missing_handoff")  # a rank cannot write its error there
    assert done.returncode != 0
    assert "Root Cause (first observed failure)" in done.stderr  # torchrun's table: all there is to go on
