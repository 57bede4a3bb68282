"""Run under torchrun by test_trainer_ranks.py: one rank of a data-parallel `train` call.

argv: OUT_DIR STEPS BATCH_SIZE ZERO_STAGE CHECKPOINT_DIR|- STOP_AFTER_STEP|-
Rank 0 writes losses.json and model.safetensors into OUT_DIR; a failing rank writes error.txt.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, SEQ = 64, 16


def pattern_blocks(n: int = 64, seed: int = 0) -> np.ndarray:
    """Counting sequences mod VOCAB from random starts (as test_trainer.py)."""
    starts = np.random.default_rng(seed).integers(0, VOCAB, size=(n, 1))
    return ((starts + np.arange(SEQ)) % VOCAB).astype(np.int32)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from components.model.presets import build_model
    from components.train.dense import DenseTraining
    from components.train.trainer import end_distributed, save_weights, train

    out, steps, batch, zero, checkpoints, stop = sys.argv[1:7]
    out = Path(out)
    rank = int(os.environ["RANK"])
    config = DenseTraining.Params(steps=int(steps), batch_size=int(batch), lr=3e-3, warmup_steps=2, precision="fp32",
                                  zero_stage=int(zero), checkpoint_every=3 if checkpoints != "-" else 0)
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)
    try:
        result = train(model, pattern_blocks(), config, DenseTraining(config), progress=False,
                       checkpoint_dir=None if checkpoints == "-" else Path(checkpoints),
                       stop_after_step=None if stop == "-" else int(stop))
    except Exception as e:
        (out / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
    if rank == 0:
        save_weights(model, out / "model.safetensors")
        (out / "losses.json").write_text(json.dumps(result.losses))
    end_distributed()
