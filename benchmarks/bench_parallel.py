"""Cold wall time of a recipe at ``--max-parallel 1`` and ``2``, and its critical path.

Each try runs ``paperdag run RECIPE --max-parallel N`` in its own fresh workspace (a copy of
params/, plus the recipe file if it lives elsewhere), as its own process; the settings
alternate (1, 2, 1, 2, ...) on the same machine so drift hits both. Reported: every wall time,
the ratio of the medians, each stage's seconds, the critical path (the longest chain of stages
through the DAG, by the stage seconds of the first N=1 try) and the bound it puts on any
speed-up, and whether the settings built byte-identical models.

    python benchmarks/bench_parallel.py [--recipe quickstart | --recipe tests/recipes/nano.yaml] [--tries 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from flows.recipe import load_plan  # noqa: E402
from flows.report import critical_path  # noqa: E402

STAGE_HEAD = re.compile(r"^\[\d+/\d+\] (\S+) ")
STAGE_END = re.compile(r"\b(?:done|cached) in ([\d.]+)s$")


def stage_seconds(text: str) -> dict[str, float]:
    """Each stage's seconds from the run's stage lines. One after another, a line can be split
    by what the stage printed (DeepSpeed's first op build): its end belongs to the last head."""
    seconds, current = {}, None
    for line in text.splitlines():
        if head := STAGE_HEAD.match(line):
            current = head.group(1)
        if (end := STAGE_END.search(line)) and current:
            seconds[current] = float(end.group(1))
    return seconds


def run(ws: Path, recipe: str, parallel: int, log: Path, overrides: list[str]) -> tuple[float, dict[str, float]]:
    """One cold run in ``ws``: (wall seconds, each stage's seconds)."""
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", recipe, "--no-progress",
                           "--max-parallel", str(parallel), *[a for o in overrides for a in ("--set", o)]], cwd=ws, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"--max-parallel {parallel} failed ({proc.returncode}); see {log}")
    return wall, stage_seconds(proc.stdout)


def model_digests(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.glob("artifacts/*/*/model.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quickstart", help="a recipe name under params/ or a path to a recipe file")
    ap.add_argument("--tries", type=int, default=2, help="cold runs per setting, alternating")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to paperdag run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parallel.json"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_file = (Path(args.recipe) if args.recipe.endswith((".yaml", ".yml"))
                   else REPO / "params" / f"{args.recipe}.yaml").resolve()
    name = recipe_file.stem
    walls: dict[int, list[float]] = {1: [], 2: []}
    stages, digests = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(args.tries):
            for n in (1, 2):
                ws = Path(tmp) / f"ws{n}-{attempt}"
                shutil.copytree(REPO / "params", ws / "params")
                shutil.copy(recipe_file, ws / "params" / f"{name}.yaml")
                wall, seconds = run(ws, name, n, out.with_suffix(f".p{n}.log"), args.set)
                walls[n].append(wall)
                stages.setdefault(n, seconds)
                digests.setdefault(n, model_digests(ws))
                shutil.rmtree(ws)
                print(f"--max-parallel {n}, try {attempt + 1}: {wall:.1f} s", flush=True)
    path, path_s = critical_path(load_plan(recipe_file, args.set)[1], stages[1])
    median = {n: statistics.median(w) for n, w in walls.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip()
    total_1 = sum(stages[1].values())
    result = {
        "recipe": name, "recipe_file": str(recipe_file.relative_to(REPO)), "overrides": args.set, "commit": commit,
        "cpu": _cpu_model(), "cores": os.cpu_count(),
        "wall_s": {str(n): [round(w, 1) for w in ws_] for n, ws_ in walls.items()},
        "speedup_2_over_1_medians": round(median[1] / median[2], 3),
        "stage_seconds_first_try": {str(n): s for n, s in stages.items()},
        "sum_of_stage_seconds_1": round(total_1, 1),
        "critical_path": path, "critical_path_s": round(path_s, 1),
        "bound_on_speedup": round(total_1 / path_s, 3),
        "identical_models": digests[1] == digests[2], "models_compared": len(digests[1]),
    }
    out.write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {stage} | {stages[1].get(stage, 0):.1f} | {stages[2].get(stage, 0):.1f} | "
                     f"{'yes' if stage in path else ''} |" for stage in stages[1])
    out.with_suffix(".md").write_text(
        f"# `{name}` cold, at `--max-parallel 1` and `2`\n\n"
        f"`python benchmarks/bench_parallel.py --recipe {args.recipe} --tries {args.tries}"
        f"{''.join(f' --set {o}' for o in args.set)}` at commit {commit}, "
        f"{result['cpu']}, {os.cpu_count()} cores. Wall times (s), alternating: "
        f"1: {result['wall_s']['1']}, 2: {result['wall_s']['2']}. "
        f"Median at 1 over median at 2: **{median[1] / median[2]:.2f}x**.\n\n"
        f"The critical path ({' -> '.join(path)}) takes {path_s:.1f} s of the {total_1:.1f} s of stage time "
        f"at 1, so no number of workers can beat {total_1 / path_s:.2f}x on stage time alone. Models "
        f"byte-identical between the settings: {'yes' if result['identical_models'] else 'NO'} "
        f"({len(digests[1])} compared).\n\n"
        f"| stage | seconds at 1 | seconds at 2 | on the critical path |\n|---|---|---|---|\n{rows}\n")
    print(json.dumps(result, indent=2))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
