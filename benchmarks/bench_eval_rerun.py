"""The cost of changing one quantize stage, before and after per-model evaluation caching.

    python benchmarks/bench_eval_rerun.py --workspace WS --before <commit> [--runs 2]

The workspace must hold the quickstart built by both commits (run ``paperdag run quickstart``
with each; shared stages have one digest). Each timed run is what a user does after a
quickstart: ``paperdag run quickstart --set stages.quantize_int4.params.bits=3``, which builds
the 3-bit quantize stage and the evaluate stage. After each run, every artifact it created is
removed again (its 3-bit model, its evaluate, the per-model evaluation of the 3-bit model), so
each run starts from the same workspace. ``before`` runs from a temporary git worktree of that
commit, ``after`` from this tree, alternating so a shared machine's drift hits both. Writes
benchmarks/results/eval_rerun.json and .md: median wall seconds, the evaluate stage's seconds
and the paired ratio before/after.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _before_after import REPO, head_commit, parse_args, worktree  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ARGV = ["run", "quickstart", "--no-progress", "--set", "stages.quantize_int4.params.bits=3"]
STAGE = re.compile(r"^\[\d+/\d+\]\s+(\S+)\s|done in ([0-9.]+)s", re.MULTILINE)


def artifact_dirs(ws: Path) -> set[Path]:
    return {p for p in (ws / "artifacts").glob("*/*") if not p.name.startswith(".")}


def timed_run(tree: Path, ws: Path) -> dict:
    """One rerun from ``tree``'s code; every artifact it made is removed afterwards."""
    before = artifact_dirs(ws)
    env = dict(os.environ, PYTHONPATH=str(tree), PAPERDAG_WORKSPACE=str(ws))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *ARGV], cwd=ws, env=env, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: paperdag {' '.join(ARGV)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stages, current = {}, None
    for name, seconds in STAGE.findall(proc.stdout):  # "done in" can follow a progress bar's lines
        if name:
            current = name
        elif current is not None:
            stages[current] = float(seconds)
    made = artifact_dirs(ws) - before
    if {p.parent.name for p in made} - {"quantize", "evaluate", "model_eval"}:
        raise SystemExit(f"the rerun built more than the 3-bit model and its evaluation: {sorted(map(str, made))}; "
                         "build the quickstart with both commits first")
    for p in made:
        shutil.rmtree(p)
    return {"wall_s": wall, "evaluate_s": stages.get("evaluate"), "quantize_int4_s": stages.get("quantize_int4"),
            "built": sorted(f"{p.parent.name}/{p.name}" for p in made)}


def main() -> int:
    args = parse_args(runs=2, out="eval_rerun")
    ws, after_commit, pairs = args.workspace, head_commit(), []
    with worktree(args.before) as before_tree:
        for i in range(args.runs):
            pair = (timed_run(before_tree, ws), timed_run(REPO, ws))
            print(f"run {i + 1}: before {pair[0]['wall_s']:.1f}s (evaluate {pair[0]['evaluate_s']}s), "
                  f"after {pair[1]['wall_s']:.1f}s (evaluate {pair[1]['evaluate_s']}s)", flush=True)
            pairs.append(pair)

    def median(side: int, key: str) -> float:
        return round(statistics.median(p[side][key] for p in pairs), 1)

    result = {
        "before": args.before, "after": after_commit, "runs": args.runs, "command": "paperdag " + " ".join(ARGV),
        "before_wall_s": median(0, "wall_s"), "after_wall_s": median(1, "wall_s"),
        "before_evaluate_s": median(0, "evaluate_s"), "after_evaluate_s": median(1, "evaluate_s"),
        "ratio_wall_before_over_after": round(statistics.median(b["wall_s"] / a["wall_s"] for b, a in pairs), 2),
        "ratio_evaluate_before_over_after": round(
            statistics.median(b["evaluate_s"] / a["evaluate_s"] for b, a in pairs), 2),
        "pairs": pairs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"`{result['command']}` after a built quickstart, median of {args.runs} alternating runs; "
             f"before = {args.before[:12]}, after = {after_commit[:12]}", "",
             "| | before | after | before / after |", "|---|---|---|---|",
             f"| whole command (s) | {result['before_wall_s']} | {result['after_wall_s']} | "
             f"{result['ratio_wall_before_over_after']}x |",
             f"| evaluate stage (s) | {result['before_evaluate_s']} | {result['after_evaluate_s']} | "
             f"{result['ratio_evaluate_before_over_after']}x |"]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
