"""One rank of bench_ranks.py: train a fresh preset model on seeded random blocks, rank 0 writes result.json.

argv: OUT_DIR PRESET STEPS GLOBAL_BATCH SEQ_LEN
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np

    from components.model.presets import build_model
    from components.train.dense import DenseTraining
    from components.train.trainer import train

    out, preset, steps, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    vocab = 4096
    blocks = np.random.default_rng(0).integers(0, vocab, size=(batch * steps, seq)).astype(np.int32)
    config = DenseTraining.Params(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=4, precision="fp32",
                                  torch_compile=False)
    model = build_model(preset, vocab_size=vocab, max_seq_len=seq, seed=0)
    result = train(model, blocks, config, DenseTraining(config), progress=False)
    if int(os.environ["RANK"]) == 0:
        (Path(out) / "result.json").write_text(json.dumps(dataclasses.asdict(result)))
