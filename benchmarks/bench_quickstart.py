"""Cold vs warm wall time of a recipe run: the warm run must be all cache hits and take at
most 10% of the cold run.

Runs `paperdag run RECIPE` twice in a fresh workspace (a copy of params/), each as its own
process, and writes the two wall times, their ratio and the cache-hit counts.

    python benchmarks/bench_quickstart.py [--recipe quickstart]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(ws: Path, recipe: str, log: Path) -> tuple[float, str]:
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", recipe, "--no-progress"], cwd=ws, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}); see {log}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quickstart.json"))
    ap.add_argument("--workspace", help="keep the workspace here (must not exist yet) instead of a temp dir")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(args.workspace) if args.workspace else Path(tmp) / "ws"
        if ws.exists():
            sys.exit(f"{ws} exists; the cold run needs an empty workspace")
        shutil.copytree(REPO / "params", ws / "params")
        cold, cold_out = run(ws, args.recipe, out.with_suffix(".cold.log"))
        warm, warm_out = run(ws, args.recipe, out.with_suffix(".warm.log"))
    hits = lambda text: re.search(r"(\d+) stages, (\d+) cache hits", text).groups()
    result = {"recipe": args.recipe, "cold_s": cold, "warm_s": warm, "warm_over_cold": warm / cold,
              "cold_stages_and_hits": hits(cold_out), "warm_stages_and_hits": hits(warm_out)}
    out.write_text(json.dumps(result, indent=2))
    table = cold_out[cold_out.index("results ("):cold_out.index("lineage:")] if "results (" in cold_out else ""
    out.with_suffix(".table.txt").write_text(table)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
