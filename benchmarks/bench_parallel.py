"""Cold wall time of a recipe at ``--max-parallel 1`` and ``2``, and its critical path.

Each setting runs ``paperdag run RECIPE --max-parallel N`` in its own fresh workspace (a copy
of params/), as its own process, one after the other on the same machine. Reported: both wall
times and their ratio, each stage's seconds, the critical path (the longest chain of stages
through the DAG, by the stage seconds of the N=1 run) and the bound it puts on any speed-up,
and whether the two runs built byte-identical models.

    python benchmarks/bench_parallel.py [--recipe quickstart] [--out benchmarks/results/parallel.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGE_LINE = re.compile(r"^\[\d+/\d+\] (\S+)\s.*\b(?:done|cached) in ([\d.]+)s$", re.M)


def run(ws: Path, recipe: str, parallel: int, log: Path) -> tuple[float, dict[str, float]]:
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", recipe, "--no-progress",
                           "--max-parallel", str(parallel)], cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"--max-parallel {parallel} failed ({proc.returncode}); see {log}")
    return wall, {name: float(s) for name, s in STAGE_LINE.findall(proc.stdout)}


def critical_path(recipe_path: Path, seconds: dict[str, float]) -> tuple[list[str], float]:
    from flows.recipe import load_plan

    _, plan = load_plan(recipe_path, [])
    best: dict[str, tuple[float, list[str]]] = {}
    for name in plan.stages:  # plan order is topological
        ups = [best[u] for u in plan.stages[name].upstream]
        before = max(ups, default=(0.0, []))
        best[name] = (before[0] + seconds.get(name, 0.0), before[1] + [name])
    total, path = max(best.values())
    return path, total


def model_digests(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.glob("artifacts/*/*/model.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parallel.json"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    walls, stages, digests = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            ws = Path(tmp) / f"ws{n}"
            shutil.copytree(REPO / "params", ws / "params")
            walls[n], stages[n] = run(ws, args.recipe, n, out.with_suffix(f".p{n}.log"))
            digests[n] = model_digests(ws)
            print(f"--max-parallel {n}: {walls[n]:.1f} s", flush=True)
    path, path_s = critical_path(REPO / "params" / f"{args.recipe}.yaml", stages[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {
        "recipe": args.recipe, "commit": commit, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "wall_s": {str(n): round(w, 1) for n, w in walls.items()},
        "speedup_2_over_1": round(walls[1] / walls[2], 3),
        "stage_seconds": {str(n): s for n, s in stages.items()},
        "sum_of_stage_seconds_1": round(sum(stages[1].values()), 1),
        "critical_path": path, "critical_path_s": round(path_s, 1),
        "bound_on_speedup": round(sum(stages[1].values()) / path_s, 3),
        "identical_models": digests[1] == digests[2], "models_compared": len(digests[1]),
    }
    out.write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {name} | {stages[1].get(name, 0):.1f} | {stages[2].get(name, 0):.1f} | "
                     f"{'yes' if name in path else ''} |" for name in stages[1])
    out.with_suffix(".md").write_text(
        f"# `{args.recipe}` cold, at `--max-parallel 1` and `2` (commit {commit}, {os.cpu_count()} cores)\n\n"
        f"Wall time: {walls[1]:.1f} s at 1, {walls[2]:.1f} s at 2: **{walls[1] / walls[2]:.2f}x**. "
        f"The critical path ({' -> '.join(path)}) takes {path_s:.1f} s of the {sum(stages[1].values()):.1f} s "
        f"of stage time, so no number of workers can beat {sum(stages[1].values()) / path_s:.2f}x on stage "
        f"time alone. Models byte-identical between the two runs: "
        f"{'yes' if result['identical_models'] else 'NO'} ({len(digests[1])} compared).\n\n"
        f"| stage | seconds at 1 | seconds at 2 | on the critical path |\n|---|---|---|---|\n{rows}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
