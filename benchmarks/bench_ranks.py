"""Data-parallel training on this machine: 1 rank against N ranks at the same global batch.

Each try trains the same model (a preset, fresh from a seed) on the same blocks for the same
steps, through the project's trainer (`components/train/trainer.py`), launched with `torchrun
--standalone` as a stage with `resources.ranks` launches it; the settings alternate (1, N, 1, N,
...) so drift on a shared machine hits both. One rank gets all the cores as torch threads; N ranks
share them out (cores // N each), as `tasks/train_ranks.py` does. Reported: the training wall
(the `train` call, from `TrainResult`) and the whole launch (process start-up included), the
ratio of the medians, and the largest relative difference between the loss curves.

    python benchmarks/bench_ranks.py [--preset micro] [--ranks 2] [--steps 40] [--batch 16] [--tries 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORKER = REPO / "benchmarks" / "_ranks_worker.py"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def launch(ranks: int, args, out: Path) -> dict:
    from components.train.trainer import _OWN_DIST_ENV
    from tasks.train_ranks import RANK_ENV

    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (*RANK_ENV, _OWN_DIST_ENV)}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
               str(ranks), str(WORKER), str(out), args.preset, str(args.steps), str(args.batch), str(args.seq)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    return {"launch_s": wall, "train_s": result["wall_seconds"], "losses": result["losses"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    tries: dict[int, list[dict]] = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(args.tries):
            for ranks in (1, args.ranks):
                tries[ranks].append(launch(ranks, args, Path(tmp) / f"{ranks}-{t}"))
                print(f"try {t}: {ranks} rank(s): train {tries[ranks][-1]['train_s']:.1f} s, "
                      f"launch {tries[ranks][-1]['launch_s']:.1f} s", flush=True)
    one, many = tries[1], tries[args.ranks]
    median = {k: {n: statistics.median(x[k] for x in tries[n]) for n in tries} for k in ("train_s", "launch_s")}
    drift = max(abs(a - b) / abs(b) for a, b in zip(many[0]["losses"], one[0]["losses"]))
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "settings": {"preset": args.preset, "ranks": args.ranks, "steps": args.steps, "global_batch": args.batch,
                     "seq_len": args.seq, "tries": args.tries},
        "train_s": {str(n): [round(x["train_s"], 2) for x in tries[n]] for n in tries},
        "launch_s": {str(n): [round(x["launch_s"], 2) for x in tries[n]] for n in tries},
        "ratio_train_many_over_one": median["train_s"][args.ranks] / median["train_s"][1],
        "ratio_launch_many_over_one": median["launch_s"][args.ranks] / median["launch_s"][1],
        "max_relative_loss_difference": drift,
    }
    (RESULTS / "ranks.json").write_text(json.dumps(result, indent=2))
    n = args.ranks
    (RESULTS / "ranks.md").write_text("\n".join([
        f"`{args.preset}` preset, {args.steps} steps of {args.batch} blocks x {args.seq} tokens (the global batch), "
        f"{args.tries} alternating tries on {result['machine']}; one rank has every core as torch threads, {n} ranks "
        "share them out.", "",
        f"| | 1 rank | {n} ranks | {n} ranks / 1 rank (medians) |", "|---|---|---|---|",
        f"| training (the `train` call) | {', '.join(f'{x:.1f}' for x in result['train_s']['1'])} s | "
        f"{', '.join(f'{x:.1f}' for x in result['train_s'][str(n)])} s | **{result['ratio_train_many_over_one']:.2f}** |",
        f"| whole launch (start-up included) | {', '.join(f'{x:.1f}' for x in result['launch_s']['1'])} s | "
        f"{', '.join(f'{x:.1f}' for x in result['launch_s'][str(n)])} s | {result['ratio_launch_many_over_one']:.2f} |",
        "", f"Largest relative difference between the two loss curves: {drift:.1e}.", ""]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
