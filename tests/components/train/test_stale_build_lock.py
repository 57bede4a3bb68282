"""A torch-extension build lock left by a killed process does not hang the next training run.

torch's JIT builder waits, without a timeout, for its ``lock`` file to disappear; a process
killed mid-build leaves it behind. DeepSpeed's CPU backend used to build its shared-memory op
on every process-group start, so one stale lock stalled every later stage forever."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent("""
    import os, sys
    from torch.utils.cpp_extension import _get_build_directory
    build = _get_build_directory("deepspeed_shm_comm", verbose=False)
    open(os.path.join(build, "lock"), "w").close()  # what a build killed mid-way leaves
    from components.train.trainer import _init_distributed
    _init_distributed()
    import torch.distributed as dist
    print("world_size", dist.get_world_size(), "build_dir", sorted(os.listdir(build)))
""")


def test_process_group_starts_despite_a_stale_shm_build_lock(tmp_path):
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(tmp_path))
    try:
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process group did not start within 180 s: waiting on the stale build lock") from None
    assert done.returncode == 0, done.stderr[-3000:]
    # nothing was compiled: the build directory holds only the stale lock
    assert "world_size 1 build_dir ['lock']" in done.stdout, done.stdout
