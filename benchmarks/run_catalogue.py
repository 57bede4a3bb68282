"""Run every recipe in params/ in one workspace, at one commit, and record what each measured.

Recipes share data, tokenizer and pretraining artifacts by digest, so after the quickstart
the others only run their own stages. Writes benchmarks/results/catalogue.json: per recipe the
commit, every stage's digest and code version, wall time, stages, cache hits, and each claim
with its verdict (PASS, FAIL, NOT DISCRIMINATING), kind, control and interval; and
<recipe>.table.txt / <recipe>.log. README section 5 and RESULTS.md are generated from that
file (`python benchmarks/report.py`), and a test fails when they were not.

The tree must be clean: a number is only worth quoting with the commit that produced it.
catalogue.json always describes one commit: when a pass at a new commit records its first
recipe, the rows of the earlier commit move to catalogue_previous.json (the latest row of each
recipe, with its own commit), so a pass cut short leaves the recipes it has not reached listed
with what an earlier pass measured, never mixed into this one.

    python benchmarks/run_catalogue.py --workspace /tmp/paperdag-catalogue [recipe ...]

A full pass is hours on 2 cores. `--resume` skips the recipes this commit already recorded
with return code 0 and every evaluate stage's metrics, so a pass cut short (a closed laptop, a
session that ended) goes on where it stopped; the workspace's cache keeps the stages a cut-short
recipe finished.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CATALOGUE = RESULTS / "catalogue.json"
PREVIOUS = RESULTS / "catalogue_previous.json"
CODE_DIRS = ("flows", "tasks", "components", "params")
sys.path.insert(0, str(REPO))
from tasks.artifacts import DIGEST_LEN  # noqa: E402


class DirtyTreeError(RuntimeError):
    pass


def clean_commit() -> str:
    """HEAD, refusing a tree with changes to tracked files or untracked files in code or recipes."""
    status = subprocess.run(["git", "status", "--porcelain", "--", *CODE_DIRS, "pyproject.toml"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    if status:
        raise DirtyTreeError("the tree has uncommitted changes; commit them first, so every number is recorded "
                             "with the code that produced it:\n" + status)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def stage_record(ws: Path, name: str) -> dict:
    """Each stage's digest, kind and code version as this commit compiles the recipe, from the
    copy in the workspace that the run read (so the digests are the ones the run used)."""
    sys.path.insert(0, str(REPO))
    from flows.recipe import load_plan

    with contextlib.chdir(ws):  # recipe paths (review labels) are relative to where paperdag runs
        _, plan = load_plan(ws / "params" / f"{name}.yaml")
    return {"digests": {s.name: s.digest for s in plan.stages.values()},
            "kinds": {s.name: s.kind for s in plan.stages.values()},
            "code_versions": {s.name: s.code_version for s in plan.stages.values()}}


def recorded_complete(commit: str) -> set[str]:
    """Recipes the catalogue holds for ``commit`` that ran to the end with every metric."""
    if not CATALOGUE.exists():
        return set()
    return {name for name, e in json.loads(CATALOGUE.read_text()).items()
            if e.get("commit") == commit and e.get("returncode") == 0 and not e.get("missing_metrics")}


def _write_json(path: Path, rows: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(rows.items(), key=lambda kv: kv[0] != "quickstart")), indent=2))
    os.replace(tmp, path)


def record(name: str, entry: dict) -> None:
    """Add one recipe's row. catalogue.json keeps the rows of ``entry``'s commit only; rows of
    any other commit move to catalogue_previous.json, each replacing an older row of its recipe.
    Both files are re-read first: another pass on another workspace may have recorded meanwhile."""
    catalogue = json.loads(CATALOGUE.read_text()) if CATALOGUE.exists() else {}
    earlier = {k: v for k, v in catalogue.items() if v.get("commit") != entry["commit"]}
    if earlier:  # previous first: a pass stopped between the two writes loses nothing
        previous = json.loads(PREVIOUS.read_text()) if PREVIOUS.exists() else {}
        _write_json(PREVIOUS, {**previous, **earlier})
    catalogue = {k: v for k, v in catalogue.items() if k not in earlier}
    catalogue[name] = entry
    _write_json(CATALOGUE, catalogue)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--resume", action="store_true",
                    help="skip recipes this commit already recorded completely")
    ap.add_argument("recipes", nargs="*")
    args = ap.parse_args()
    try:
        commit = clean_commit()
    except DirtyTreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ws = Path(args.workspace).resolve()
    # a fresh copy: a recipe or label file left from another commit must not be read
    shutil.rmtree(ws / "params", ignore_errors=True)
    ws.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "params", ws / "params")
    names = args.recipes or sorted(p.stem for p in (REPO / "params").glob("*.yaml"))
    names = sorted(names, key=lambda n: n != "quickstart")  # the quickstart fills the shared cache
    if args.resume:
        done = recorded_complete(commit)
        if done:
            print(f"--resume: skipping {len(done)} recipes recorded at {commit[:12]}: {', '.join(sorted(done))}",
                  flush=True)
        names = [n for n in names if n not in done]
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")
    for name in names:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", name, "--no-progress"], cwd=ws, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        (RESULTS / f"{name}.log").write_text(proc.stdout + proc.stderr)
        entry = {"commit": commit, "cpu": cpu_model(), "returncode": proc.returncode, "wall_s": round(wall, 1),
                 **stage_record(ws, name)}
        m = re.search(r"(\d+) stages, (\d+) cache hits", proc.stdout)
        if m:
            entry.update(stages=int(m.group(1)), cache_hits=int(m.group(2)))
        if "results (" in proc.stdout:
            table = proc.stdout[proc.stdout.index("results ("):proc.stdout.index("lineage:")]
            (RESULTS / f"{name}.table.txt").write_text(table)
        claims, missing = [], []
        for stage, digest in entry["digests"].items():
            if entry["kinds"][stage] != "evaluate":
                continue
            metrics_file = ws / "artifacts" / "evaluate" / digest[:DIGEST_LEN] / "metrics.json"
            if metrics_file.exists():
                claims += json.loads(metrics_file.read_text())["claims"]
            else:
                missing.append(stage)
        if missing:  # a failed run: recorded as such, never as a recipe without claims
            entry["missing_metrics"] = missing
        entry["claims"] = [{k: c[k] for k in ("name", "statement", "kind", "verdict", "detail", "slack",
                                               "slack_interval", "control") if k in c} for c in claims]
        record(name, entry)
        verdicts = [c["verdict"] + (" (accounting)" if c["kind"] == "accounting" else "") for c in entry["claims"]]
        print(f"{name}: rc={proc.returncode} {wall:.0f}s " + ", ".join(
            f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))
            + (f" MISSING metrics of {', '.join(missing)}" if missing else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
