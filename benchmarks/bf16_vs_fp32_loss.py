""""Same learning" check: does bf16 autocast reach the fp32 validation loss?

Builds the default StandardCorpus, trains a byte-level BPE (vocab 4096) on its train split,
packs train and validation into 128-token blocks, then trains the ``micro`` preset with
paperdag's trainer at a fixed seed, for each seed, in two ways (``MODES``): the reference fp32
eager-mode run with the model's own SDPA attention, and the fastest CPU path (bf16 autocast
with fp32 master weights, torch.compile, attention ``auto``: eager at this length). Validation
loss is evaluated in fp32, eagerly, for both. Reports per-seed relative
differences and the fp32 seed-to-seed spread as the natural yardstick.

    .venv/bin/python benchmarks/bf16_vs_fp32_loss.py [--steps 300] [--seeds 0 1]

Writes benchmarks/results/bf16_vs_fp32.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.data.byte_bpe import ByteBpeTokenizer  # noqa: E402
from components.data.standard_corpus import StandardCorpus  # noqa: E402
from components.data.tokenizer import pack_documents  # noqa: E402
from components.eval.perplexity import evaluate_perplexity  # noqa: E402
from components.model.presets import build_model  # noqa: E402
from components.train.dense import DenseTraining  # noqa: E402
from components.train.trainer import train  # noqa: E402

VOCAB, SEQ = 4096, 128
MODES = {  # name -> trainer params
    "fp32": {"precision": "fp32", "torch_compile": False, "attention": "sdpa"},
    "bf16": {"precision": "bf16", "torch_compile": True, "attention": "auto"},
}


def build_blocks() -> tuple[np.ndarray, np.ndarray]:
    """Train and validation blocks of the default corpus; prints their shapes and build time."""
    start = time.perf_counter()
    docs = StandardCorpus(StandardCorpus.Params()).build()
    train_texts = docs.loc[docs["split"] == "train", "text"].tolist()
    val_texts = docs.loc[docs["split"] == "validation", "text"].tolist()
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=VOCAB, seq_len=SEQ)).train(train_texts)
    train_blocks, val_blocks = pack_documents(tokenizer, train_texts, SEQ), pack_documents(tokenizer, val_texts, SEQ)
    print(f"[{time.perf_counter() - start:5.0f}s] data: train {train_blocks.shape}, validation {val_blocks.shape}",
          flush=True)
    return train_blocks, val_blocks


def run(train_blocks, val_blocks, seed: int, mode: str, args) -> dict:
    model = build_model("micro", VOCAB, SEQ, seed=seed)
    cfg = DenseTraining.Params(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                               seed=seed, **MODES[mode])
    result = train(model, train_blocks, cfg, DenseTraining(cfg), progress=False)
    val = evaluate_perplexity(model, val_blocks, batch_size=32)
    return {"seed": seed, "precision": result.precision, "compiled": result.compiled, "attention": result.attention,
            "val_loss": val["loss"], "val_ppl": val["ppl"],
            "final_train_loss_mean_last10": float(np.mean(result.losses[-10:])),
            "train_seconds": result.wall_seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_vs_fp32.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    train_blocks, val_blocks = build_blocks()
    runs = []
    for seed in args.seeds:
        for mode in MODES:
            row = run(train_blocks, val_blocks, seed, mode, args)
            runs.append(row)
            print(f"[{time.perf_counter() - t0:5.0f}s] seed {seed} {mode}: val loss {row['val_loss']:.4f} "
                  f"(train {row['train_seconds']:.0f}s)", flush=True)
    per_seed = []
    for seed in args.seeds:
        fp32 = next(r for r in runs if r["seed"] == seed and r["precision"] == "fp32")["val_loss"]
        bf16 = next(r for r in runs if r["seed"] == seed and r["precision"] == "bf16")["val_loss"]
        rel = (bf16 - fp32) / fp32
        per_seed.append({"seed": seed, "fp32_val_loss": fp32, "bf16_val_loss": bf16, "rel_diff": rel,
                         "within_1pct": abs(rel) < 0.01})
    fp32_losses = [p["fp32_val_loss"] for p in per_seed]
    bf16_losses = [p["bf16_val_loss"] for p in per_seed]
    result = {
        "model": "micro preset", "vocab": VOCAB, "seq_len": SEQ, "steps": args.steps, "batch": args.batch,
        "lr": args.lr, "warmup": args.warmup, "modes": MODES, "train_blocks": list(train_blocks.shape),
        "validation_blocks": list(val_blocks.shape), "torch_threads": torch.get_num_threads(),
        "runs": runs, "per_seed": per_seed,
        "max_abs_rel_diff": max(abs(p["rel_diff"]) for p in per_seed),
        "all_within_1pct": all(p["within_1pct"] for p in per_seed),
        "mean_rel_diff": statistics.mean(p["rel_diff"] for p in per_seed),
        "fp32_seed_spread_rel": (max(fp32_losses) - min(fp32_losses)) / statistics.mean(fp32_losses)
        if len(fp32_losses) > 1 else None,
        "bf16_seed_spread_rel": (max(bf16_losses) - min(bf16_losses)) / statistics.mean(bf16_losses)
        if len(bf16_losses) > 1 else None,
        "wall_seconds": time.perf_counter() - t0,
        "command": "python benchmarks/bf16_vs_fp32_loss.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
