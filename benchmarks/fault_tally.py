"""Run the whole fault-injection suite (slow cases included) and record its tally.

    python benchmarks/fault_tally.py

Writes ``benchmarks/results/fault_tally.json`` (every case, its expected outcome, whether it
held, its time; the commit and machine) and rewrites the tally table in
``docs/fault_tolerance.md`` between its ``tally`` markers. Nothing in that table is typed by hand.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "fault_tally.json"
DOC = ROOT / "docs" / "fault_tolerance.md"
BEGIN, END = "<!-- tally:begin -->", "<!-- tally:end -->"


def _commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cases_file = Path(tmp) / "cases.json"
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/faults", "-m", "slow or not slow", "-q",
                               "-p", "no:randomly"], cwd=ROOT, env={**__import__("os").environ,
                                                                   "PAPERDAG_FAULT_TALLY": str(cases_file)})
        cases = json.loads(cases_file.read_text()) if cases_file.exists() else []
    tried = [c for c in cases if not c["skipped"]]
    held = [c for c in tried if c["passed"]]
    by_outcome = Counter(c["outcome"] for c in held)
    tally = {"commit": _commit(), "cpu": _cpu(), "wall_seconds": round(time.time() - started, 1),
             "cases_tried": len(tried), "cases_held": len(held), "skipped": len(cases) - len(tried),
             "clear_errors": by_outcome["clear_error"], "recovered": by_outcome["recovers"],
             "failed": [c["case"] for c in tried if not c["passed"]], "cases": cases}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(tally, indent=1) + "\n")
    table = "\n".join([
        BEGIN,
        f"Measured by `python benchmarks/fault_tally.py` at commit `{tally['commit'][:12]}` on {tally['cpu']} "
        f"({tally['wall_seconds']:.0f} s):",
        "",
        "| cases tried | held | clear error (one line naming the cause, nothing written) | recovered (rebuilt, "
        "resumed or waited, with a message) | did not hold | skipped |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {tally['cases_tried']} | {tally['cases_held']} | {tally['clear_errors']} | {tally['recovered']} | "
        f"{len(tally['failed'])} | {tally['skipped']} |",
        END])
    text = DOC.read_text()
    DOC.write_text(text.split(BEGIN)[0] + table + text.split(END, 1)[1])
    print(f"{len(held)}/{len(tried)} fault cases held; wrote {RESULT.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
