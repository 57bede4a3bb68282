"""Subprocess for the SIGKILL resume test: trains with checkpoints, slowed down by on_log."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, SEQ = 64, 16


def setup(steps: int):
    from components.model.presets import build_model
    from components.train.dense import DenseTraining

    blocks = np.random.default_rng(1).integers(0, VOCAB, size=(40, SEQ)).astype(np.int32)
    config = DenseTraining.Params(
        steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, precision="fp32", checkpoint_every=2, log_every=1
    )
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)
    return model, blocks, config, DenseTraining(config)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from components.train.trainer import train

    checkpoint_dir, steps, sleep_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    model, blocks, config, method = setup(steps)
    train(model, blocks, config, method, checkpoint_dir=checkpoint_dir, progress=False,
          on_log=lambda step, logs: time.sleep(sleep_s))
