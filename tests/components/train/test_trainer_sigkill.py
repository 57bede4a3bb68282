"""A training process killed with SIGKILL resumes from its last checkpoint bit for bit."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from components.train.trainer import complete_checkpoints, train  # noqa: E402
from tests.components.train.test_trainer import states_equal  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    spec = importlib.util.spec_from_file_location("_train_worker", Path(__file__).with_name("_train_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    steps = 16
    straight_model, blocks, config, method = worker.setup(steps)
    straight = train(straight_model, blocks, config, method, progress=False)

    # the parent's process-group variables would make the child reuse the parent's port
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, str(Path(worker.__file__)), str(tmp_path), str(steps), "0.2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not complete_checkpoints(tmp_path):
            if proc.poll() is not None:
                raise AssertionError(f"worker exited before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = complete_checkpoints(tmp_path)[-1][0]
    assert killed_at < steps

    model, blocks, config, method = worker.setup(steps)
    resumed = train(model, blocks, config, method, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_step == killed_at
    assert resumed.losses == straight.losses
    assert states_equal(model, straight_model)  # and the weights it ends with, bit for bit
