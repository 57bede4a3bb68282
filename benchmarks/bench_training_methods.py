"""Step time, peak memory, optimizer state and packed bytes of training methods against the dense
AdamW trainer, on the same model, data and steps. Two suites:

- ``sparse_lowrank``: GaLore, LoRA, SLTrain, SR-STE (issue 15);
- ``low_bit``: QAT (ternary, int4), L4Q, low-precision GEMMs (HALO INT8 levels 0 and 2, FP8 E4M3,
  FP4 blocks), BiPFT's binary network, dynamic fixed point, QFX and AdaPT: the cost of emulating
  low-bit training (issue 16).

Each (method, repeat) trains the ``micro`` preset for ``--steps`` steps in a fresh process
(``train()`` directly, fp32, no torch.compile, the trainer's own DeepSpeed engine), methods
interleaved so that machine noise spreads over all of them. Reported per method, as the median
over repeats: seconds per step (the loop after the first 3 steps), its ratio to dense AdamW in the
same run, the process's peak resident memory (``ru_maxrss``), and the optimizer-state bytes the
trainer measured (all, and those of the block matrices).

On CPU a 2:4 mask saves no time or memory: SR-STE computes with a dense masked weight, and the
emulated sparse layers (SLTrain) materialise their weight densely every step; only the state
shrinks. Likewise every low-bit method here computes in fp32 on values it rounds first, so its
ratio is the emulation's overhead, not a low-precision kernel's speed-up. The numbers say so.
Methods that pack their weights (QAT, L4Q) also report the real bytes of the packed file.

    python benchmarks/bench_training_methods.py --suite sparse_lowrank|low_bit [--steps 30] [--repeats 3]
        -> benchmarks/results/<suite>.{json,md}
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
SUITES = {
    "sparse_lowrank": [
        ("dense AdamW", "dense", {}),
        ("GaLore rank 64", "galore", {"rank": 64, "update_proj_gap": 200, "scale": 0.25}),
        ("LoRA rank 64", "lora", {"rank": 64, "alpha": 64.0}),
        ("SLTrain rank 64 + 3%", "sltrain", {"rank": 64, "alpha": 16.0, "sparse_ratio": 0.03}),
        ("2:4 (SR-STE)", "sr_ste", {"pattern": "2:4"}),
    ],
    # at the recipes' settings (trilm, l4q, halo, fp_scaling_law, bipft, dynamic_fixed_point, qfx, adapt;
    # AdaPT's lookback shortened so that format decisions, with their histogram tests, fall inside the steps)
    "low_bit": [
        ("dense AdamW", "dense", {}),
        ("QAT ternary (TriLM)", "qat", {"weight_format": "ternary"}),
        ("QAT int4, group 64", "qat", {"weight_format": "int", "bits": 4, "granularity": "group", "group_size": 64}),
        ("L4Q W4 g64, LoRA rank 8", "l4q", {"bits": 4, "group_size": 64, "rank": 8, "alpha": 16.0}),
        ("INT8 GEMMs, HALO level 0", "halo", {"gemm_format": "int8", "level": 0}),
        ("INT8 GEMMs, HALO level 2", "halo", {"gemm_format": "int8", "level": 2}),
        ("FP8 E4M3 GEMMs, level 0", "halo", {"gemm_format": "e4m3", "level": 0}),
        ("FP4 E2M1 P2/P4/P6, blocks of 32", "fp_training", {"exp_bits": 2, "man_bits": 1, "block_size": 32}),
        ("BiPFT W1A1 + estimators", "bipft", {"estimators": True}),
        ("INT8 dynamic fixed point, all GEMMs", "dfp", {"bits": 8}),
        ("QFX W4, learned binary points", "qfx", {"bits": 4}),
        ("AdaPT, adaptive fixed point", "adapt", {"min_lookback": 5, "max_lookback": 10}),
    ],
}
WARMUP_STEPS = 3


def one(key: str, params: dict, steps: int) -> dict:
    import resource
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from components.model.presets import build_model
    from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS
    from components.train.trainer import train

    cls = (PRETRAIN_METHODS if key in PRETRAIN_METHODS.keys() else FINETUNE_METHODS).get(key)  # l4q: finetune only
    config = cls.Params(steps=steps, batch_size=16, lr=1e-3, warmup_steps=2, precision="fp32",
                        torch_compile=False, log_every=1, **params)
    blocks = np.random.default_rng(0).integers(0, 4096, size=(512, 128)).astype(np.int32)
    model = build_model("micro", vocab_size=4096, max_seq_len=128, seed=0)
    times = []

    def on_log(step, metrics):
        times.append((step, time.perf_counter()))

    method = cls(config)
    result = train(model, blocks, config, method, on_log=on_log, progress=False)
    (s0, t0), (s1, t1) = times[WARMUP_STEPS - 1], times[-1]
    quantized = method.pack(model)
    return {"step_s": (t1 - t0) / (s1 - s0), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "packed_bytes": quantized.meta["packed_bytes"] if quantized else None,
            "bits_per_weight": quantized.meta["bits_per_weight"] if quantized else None,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "block_matrix_state_bytes": result.block_matrix_state_bytes, "trainable_params": result.trainable_params}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        key, params = json.loads(args.one)
        print(json.dumps(one(key, params, args.steps)))
        return 0
    methods = SUITES[args.suite]
    runs: dict[str, list[dict]] = {label: [] for label, *_ in methods}
    for repeat in range(args.repeats):
        for label, key, params in methods:
            out = subprocess.run([sys.executable, "-P", __file__, "--suite", args.suite, "--steps", str(args.steps), "--one",
                                  json.dumps([key, params])], capture_output=True, text=True, check=True, cwd=ROOT)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {label}: {runs[label][-1]['step_s']:.3f} s/step", flush=True)
    dense_step = statistics.median(r["step_s"] for r in runs["dense AdamW"])
    rows = []
    for label, key, params in methods:
        r = runs[label]
        step = statistics.median(x["step_s"] for x in r)
        rows.append({"method": label, "key": key, "params": params, "step_s": step, "ratio_to_dense": step / dense_step,
                     "step_s_each_repeat": [x["step_s"] for x in r],
                     "peak_rss_bytes": statistics.median(x["peak_rss_bytes"] for x in r),
                     **{k: r[0][k] for k in ("optimizer_state_bytes", "block_matrix_state_bytes", "trainable_params",
                                             "packed_bytes", "bits_per_weight")}})
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"suite": args.suite, "commit": commit, "cpu": cpu, "steps": args.steps, "repeats": args.repeats, "model": "micro",
              "batch_size": 16, "seq_len": 128, "precision": "fp32", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.suite}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"micro model (5.3M parameters), batch 16 x 128 tokens, fp32, {args.steps} steps, median of "
             f"{args.repeats} interleaved runs, at commit `{commit}` on {cpu}.", "",
             "| method | step time vs dense AdamW | peak RSS | optimizer state (all / block matrices) | trainable params "
             "| packed block weights (bits per weight) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        packed = (f"{r['packed_bytes'] / 2**20:.2f} MiB ({r['bits_per_weight']:.2f})" if r["packed_bytes"] else "-")
        lines.append(f"| {r['method']} | {r['ratio_to_dense']:.2f}x | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['optimizer_state_bytes'] / 2**20:.1f} / {r['block_matrix_state_bytes'] / 2**20:.1f} MiB | "
                     f"{r['trainable_params']:,} | {packed} |")
    (RESULTS / f"{args.suite}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
