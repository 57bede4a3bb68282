"""Run every recipe in params/ in one workspace and record its results table and claims.

Recipes share data, tokenizer and pretraining artifacts by digest, so after the quickstart
the others only run their own stages. Writes benchmarks/results/catalogue.json (per recipe:
wall time, stages, cache hits, claims with PASS/FAIL) and <recipe>.table.txt.

    python benchmarks/run_catalogue.py --workspace /tmp/paperdag-catalogue [recipe ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("recipes", nargs="*")
    args = ap.parse_args()
    ws = Path(args.workspace)
    (ws / "params").mkdir(parents=True, exist_ok=True)
    for recipe in sorted((REPO / "params").glob("*.yaml")):
        shutil.copy(recipe, ws / "params" / recipe.name)
    names = args.recipes or sorted(p.stem for p in (REPO / "params").glob("*.yaml"))
    names = sorted(names, key=lambda n: n != "quickstart")  # the quickstart fills the shared cache
    out_file = RESULTS / "catalogue.json"
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")
    for name in names:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", name, "--no-progress"], cwd=ws, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        (RESULTS / f"{name}.log").write_text(proc.stdout + proc.stderr)
        entry = {"returncode": proc.returncode, "wall_s": wall}
        m = re.search(r"(\d+) stages, (\d+) cache hits", proc.stdout)
        if m:
            entry.update(stages=int(m.group(1)), cache_hits=int(m.group(2)))
        if "results (" in proc.stdout:
            table = proc.stdout[proc.stdout.index("results ("):proc.stdout.index("lineage:")]
            (RESULTS / f"{name}.table.txt").write_text(table)
        claims = []
        for digest in re.findall(r"^\[\d+/\d+\] \S+\s+evaluate\s+\S+\s+([0-9a-f]{12})", proc.stdout, re.M):
            for metrics_file in (ws / "artifacts" / "evaluate").glob(f"{digest}*/metrics.json"):
                claims += json.loads(metrics_file.read_text())["claims"]
        entry["claims"] = [{k: c[k] for k in ("name", "statement", "passed", "detail")} for c in claims]
        # re-read before writing: another run_catalogue (another workspace, other recipes) may
        # have recorded its results meanwhile
        catalogue = json.loads(out_file.read_text()) if out_file.exists() else {}
        catalogue[name] = entry
        tmp = out_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(catalogue, indent=2))
        os.replace(tmp, out_file)
        print(f"{name}: rc={proc.returncode} {wall:.0f}s "
              f"{sum(c['passed'] for c in claims)}/{len(claims)} claims pass", flush=True)


if __name__ == "__main__":
    main()
