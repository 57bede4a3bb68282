"""Start-up time of the commands that only look, before and after a change, paired in one run.

    python benchmarks/bench_cli.py --workspace WS --before <commit> [--runs 5]

Checks the ``before`` commit out into a temporary git worktree and times each command there and
in this tree, alternating (before, after, before, ...) so drift in a shared machine's speed hits
both. Both trees share one cache directory (file hashes, compiled plans) made for the run. A
``(cold plan cache)`` row empties the compiled-plan cache before every timed call: what the first
command after an edit to a recipe or to the code pays; the other rows find it warm. Writes benchmarks/results/<--out, default cli_startup>.json and .md: the median seconds of each and the
ratio before/after, pair by pair. The workspace must hold built artifacts (for show/lineage).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _before_after import REPO, head_commit, parse_args, worktree  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def commands(ws: Path) -> dict[str, list[str]]:
    manifest = next(ws.glob("artifacts/quantize/*/manifest.json"))
    digest = json.loads(manifest.read_text())["digest"][:12]
    return {
        "--help": ["--help"],
        "lineage DIGEST": ["lineage", digest],
        "validate quickstart": ["validate", "quickstart"],
        "status quickstart": ["status", "quickstart"],
        "list": ["list"],
        "validate quickstart (cold plan cache)": ["validate", "quickstart"],
        "list (cold plan cache)": ["list"],
    }


CACHE = Path(tempfile.mkdtemp(prefix="paperdag-bench-cli-"))


def timed(tree: Path, ws: Path, args: list[str], cold: bool = False) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), PAPERDAG_WORKSPACE=str(ws), PAPERDAG_CACHE_DIR=str(CACHE))
    if cold:
        shutil.rmtree(CACHE / "plans", ignore_errors=True)
    start = time.perf_counter()
    # -P: the workspace may itself be a checkout; only PYTHONPATH may say whose code runs
    subprocess.run([sys.executable, "-P", "-m", "flows.cli", *args], cwd=ws, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> int:
    args = parse_args(runs=5, out="cli_startup")
    ws, after_commit, rows = args.workspace, head_commit(), {}
    with worktree(args.before) as before_tree:
        for label, argv in commands(ws).items():
            cold = "cold" in label
            timed(before_tree, ws, argv), timed(REPO, ws, argv)  # warm-up: page cache, .pyc files, caches
            pairs = [(timed(before_tree, ws, argv, cold), timed(REPO, ws, argv, cold)) for _ in range(args.runs)]
            rows[label] = {"before_s": round(statistics.median(b for b, _ in pairs), 3),
                           "after_s": round(statistics.median(a for _, a in pairs), 3),
                           "ratio_before_over_after": round(statistics.median(b / a for b, a in pairs), 2)}
            print(label, rows[label], flush=True)
    shutil.rmtree(CACHE, ignore_errors=True)
    result = {"before": args.before, "after": after_commit, "runs": args.runs, "commands": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"CLI start-up, median of {args.runs} alternating runs; before = {args.before[:12]}, "
             f"after = {after_commit[:12]}", "", "| command | before (s) | after (s) | before / after |",
             "|---|---|---|---|"]
    lines += [f"| `paperdag {k}` | {v['before_s']} | {v['after_s']} | {v['ratio_before_over_after']}x |"
              for k, v in rows.items()]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
