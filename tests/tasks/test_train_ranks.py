"""The multi-rank launcher's plumbing, without launching: its command lines, the metrics it
forwards while ranks train, and how a rank's error comes back under the stage's name.
(tests/components/train/test_trainer_ranks.py and the e2e test launch real ranks.)"""
from __future__ import annotations

import json
import sys

import pytest

from components.train.trainer import NonFiniteLossError
from tasks.train_ranks import RankFailedError, _forward_metrics, _rank_error, launcher_command


def test_one_machine_uses_torchrun_and_a_hostfile_the_deepspeed_launcher(tmp_path):
    spec = tmp_path / "spec.json"
    assert launcher_command(spec, 4) == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes",
                                         "1", "--nproc_per_node", "4", "-m", "tasks.train_ranks", str(spec)]
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
