"""Step time, peak memory and optimizer state of the sparse and low-rank training methods against
the dense AdamW trainer, on the same model, data and steps.

Each (method, repeat) trains the ``micro`` preset for ``--steps`` steps in a fresh process
(``train()`` directly, fp32, no torch.compile, the trainer's own DeepSpeed engine), methods
interleaved so that machine noise spreads over all of them. Reported per method, as the median
over repeats: seconds per step (the loop after the first 3 steps), its ratio to dense AdamW in the
same run, the process's peak resident memory (``ru_maxrss``), and the optimizer-state bytes the
trainer measured (all, and those of the block matrices).

On CPU a 2:4 mask saves no time or memory: SR-STE computes with a dense masked weight, and the
emulated sparse layers (SLTrain) materialise their weight densely every step; only the state
shrinks. The numbers say so.

    python benchmarks/bench_sparse_lowrank.py [--steps 30] [--repeats 3]
        -> benchmarks/results/sparse_lowrank.{json,md}
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (label, registry key, params) at the recipes' settings for the micro model (width 256)
METHODS = [
    ("dense AdamW", "dense", {}),
    ("GaLore rank 64", "galore", {"rank": 64, "update_proj_gap": 200, "scale": 0.25}),
    ("LoRA rank 64", "lora", {"rank": 64, "alpha": 64.0}),
    ("SLTrain rank 64 + 3%", "sltrain", {"rank": 64, "alpha": 16.0, "sparse_ratio": 0.03}),
    ("2:4 (SR-STE)", "sr_ste", {"pattern": "2:4"}),
]
WARMUP_STEPS = 3


def one(key: str, params: dict, steps: int) -> dict:
    import resource
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from components.model.presets import build_model
    from components.train.registry import PRETRAIN_METHODS
    from components.train.trainer import train

    cls = PRETRAIN_METHODS.get(key)
    config = cls.Params(steps=steps, batch_size=16, lr=1e-3, warmup_steps=2, precision="fp32",
                        torch_compile=False, log_every=1, **params)
    blocks = np.random.default_rng(0).integers(0, 4096, size=(512, 128)).astype(np.int32)
    model = build_model("micro", vocab_size=4096, max_seq_len=128, seed=0)
    times = []

    def on_log(step, metrics):
        times.append((step, time.perf_counter()))

    result = train(model, blocks, config, cls(config), on_log=on_log, progress=False)
    (s0, t0), (s1, t1) = times[WARMUP_STEPS - 1], times[-1]
    return {"step_s": (t1 - t0) / (s1 - s0), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "block_matrix_state_bytes": result.block_matrix_state_bytes, "trainable_params": result.trainable_params}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        key, params = json.loads(args.one)
        print(json.dumps(one(key, params, args.steps)))
        return 0
    runs: dict[str, list[dict]] = {label: [] for label, *_ in METHODS}
    for repeat in range(args.repeats):
        for label, key, params in METHODS:
            out = subprocess.run([sys.executable, "-P", __file__, "--steps", str(args.steps), "--one",
                                  json.dumps([key, params])], capture_output=True, text=True, check=True, cwd=ROOT)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {label}: {runs[label][-1]['step_s']:.3f} s/step", flush=True)
    dense_step = statistics.median(r["step_s"] for r in runs["dense AdamW"])
    rows = []
    for label, key, params in METHODS:
        r = runs[label]
        step = statistics.median(x["step_s"] for x in r)
        rows.append({"method": label, "key": key, "params": params, "step_s": step, "ratio_to_dense": step / dense_step,
                     "step_s_each_repeat": [x["step_s"] for x in r],
                     "peak_rss_bytes": statistics.median(x["peak_rss_bytes"] for x in r),
                     **{k: r[0][k] for k in ("optimizer_state_bytes", "block_matrix_state_bytes", "trainable_params")}})
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"commit": commit, "cpu": cpu, "steps": args.steps, "repeats": args.repeats, "model": "micro",
              "batch_size": 16, "seq_len": 128, "precision": "fp32", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sparse_lowrank.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"micro model (5.3M parameters), batch 16 x 128 tokens, fp32, {args.steps} steps, median of "
             f"{args.repeats} interleaved runs, at commit `{commit}` on {cpu}.", "",
             "| method | step time vs dense AdamW | peak RSS | optimizer state (all / block matrices) | trainable params |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio_to_dense']:.2f}x | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['optimizer_state_bytes'] / 2**20:.1f} / {r['block_matrix_state_bytes'] / 2**20:.1f} MiB | "
                     f"{r['trainable_params']:,} |")
    (RESULTS / "sparse_lowrank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
