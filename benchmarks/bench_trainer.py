"""Training-step time: paperdag's DeepSpeed trainer vs a bare PyTorch loop, same model and batch.

Both run the same micro model, batch, data and precision in this one process, alternating
repeats so machine noise hits both alike. Reports median seconds per step and the ratio
(target: trainer / bare <= 1.05 at the same precision).

    python benchmarks/bench_trainer.py [--steps 20] [--repeats 3] [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.model.presets import build_model  # noqa: E402
from components.train.dense import DenseTraining  # noqa: E402
from components.train.trainer import resolve_precision, train  # noqa: E402

SEQ, VOCAB, BATCH = 256, 4096, 16


def bare_loop(blocks: np.ndarray, steps: int, precision: str) -> float:
    model = build_model("micro", VOCAB, SEQ, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step in range(steps + 1):
        batch = torch.from_numpy(blocks[step * BATCH % len(blocks):][:BATCH].astype(np.int64))
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step:  # the first step pays one-time allocation costs in both loops
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def paperdag_trainer(blocks: np.ndarray, steps: int, precision: str) -> float:
    model = build_model("micro", VOCAB, SEQ, seed=0)
    cfg = DenseTraining.Params(steps=steps + 1, batch_size=BATCH, precision=precision, log_every=1)
    stamps: list[float] = []
    train(model, blocks, cfg, DenseTraining(cfg), progress=False, on_log=lambda s, m: stamps.append(time.perf_counter()))
    return statistics.median(np.diff(stamps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trainer.json"))
    args = ap.parse_args()
    precision = resolve_precision(args.precision)
    blocks = np.random.default_rng(0).integers(0, VOCAB, (BATCH * (args.steps + 2), SEQ), dtype=np.int32)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(blocks, args.steps, precision))
        ours.append(paperdag_trainer(blocks, args.steps, precision))
    result = {
        "model": "micro", "batch": BATCH, "seq_len": SEQ, "precision": precision, "steps": args.steps,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "bare_s_per_step": statistics.median(bare), "paperdag_s_per_step": statistics.median(ours),
        "ratio_paperdag_over_bare": statistics.median(ours) / statistics.median(bare),
        "bare_tokens_per_s": BATCH * SEQ / statistics.median(bare),
        "paperdag_tokens_per_s": BATCH * SEQ / statistics.median(ours),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
