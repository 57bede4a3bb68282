"""Candidate next speedups for CPU training (issue 6), same model/batch as bench_cpu_training.py.

Measures, in one run: (1) torch.compile (inductor) of the model vs eager in a bare bf16/fp32
loop: compile time (first steps) and steady-state step time; (2) AdamW ``fused=True`` vs
``foreach=True``: optimizer.step() time alone, median of many calls on real gradients.
paperdag's own trainer with and without compile is measured by bench_cpu_training.py.

    .venv/bin/python benchmarks/bench_cpu_training_next.py [--steps 10] [--repeats 2]

Writes benchmarks/results/cpu_training_next.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_cpu_training import BATCH, LR, SEQ, VOCAB, WD, bare_loop_stamps, make_model  # noqa: E402


def loop(blocks, steps: int, warmup: int, bf16: bool, compile_model: bool) -> dict:
    gaps = np.diff(bare_loop_stamps(blocks, warmup + steps, bf16, compile_model))
    return {"first_steps_s": float(sum(gaps[:warmup])), "s_per_step": float(np.median(gaps[warmup:]))}


def optimizer_step_time(kind: str, calls: int = 30) -> float:
    model = make_model()
    batch = torch.randint(0, VOCAB, (BATCH, SEQ))
    model(input_ids=batch, labels=batch).loss.backward()  # real gradient shapes and values
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WD, **{kind: True})
    opt.step()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="compiled runs recompile on the first step(s)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_training_next.json"))
    args = ap.parse_args()
    blocks = np.random.default_rng(0).integers(0, VOCAB, (BATCH * (args.warmup + args.steps), SEQ), dtype=np.int32)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for precision in args.precisions:
            for compiled in ((False, True) if r % 2 == 0 else (True, False)):
                torch._dynamo.reset()  # every compiled repeat pays (and reports) the full compile
                name = f"{precision}_{'compiled' if compiled else 'eager'}"
                row = loop(blocks, args.steps, args.warmup, precision == "bf16", compiled)
                runs.setdefault(name, []).append(row)
                print(f"[{time.perf_counter() - t0:5.0f}s] {name}: first {args.warmup} steps {row['first_steps_s']:.1f}s, "
                      f"steady {row['s_per_step']:.3f} s/step", flush=True)
    compile_summary = {
        name: {"s_per_step": statistics.median(x["s_per_step"] for x in rows),
               "first_steps_s": statistics.median(x["first_steps_s"] for x in rows), "repeats": rows}
        for name, rows in runs.items()
    }
    for precision in args.precisions:
        eager, comp = compile_summary[f"{precision}_eager"], compile_summary[f"{precision}_compiled"]
        saved = eager["s_per_step"] - comp["s_per_step"]
        extra = comp["first_steps_s"] - eager["first_steps_s"]
        compile_summary[f"{precision}_speedup"] = eager["s_per_step"] / comp["s_per_step"]
        compile_summary[f"{precision}_break_even_steps"] = extra / saved if saved > 0 else None
    opt_times = {"fused": [], "foreach": []}
    for _ in range(3):
        for kind in ("fused", "foreach"):
            opt_times[kind].append(optimizer_step_time(kind))
    optim = {k: statistics.median(v) for k, v in opt_times.items()}
    result = {"batch": BATCH, "seq_len": SEQ, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "compile": compile_summary, "adamw_step_s": optim, "adamw_step_s_repeats": opt_times,
              "wall_seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "adamw_step_s_repeats"}, indent=2, default=str))


if __name__ == "__main__":
    main()
