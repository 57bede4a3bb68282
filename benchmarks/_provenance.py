"""Where a benchmark ran: the commit and the CPU, recorded beside its numbers."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit_and_cpu() -> tuple[str, str]:
    """(short commit of the checkout, the CPU's model name)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return commit, cpu


def write_result(out: str | Path, result: dict, markdown: str) -> None:
    """``result`` as JSON at ``out`` and ``markdown`` beside it (``.md``), also printed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
