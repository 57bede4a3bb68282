"""What the before/after benchmarks share: their arguments, this tree's commit, and a temporary
git worktree of the commit they compare against."""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(runs: int, out: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--before", required=True, help="commit to compare against")
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--out", default=out, help="results file name in benchmarks/results/, without .json/.md")
    args = ap.parse_args()
    args.workspace = args.workspace.resolve()
    return args


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """The project at ``commit``, checked out in a temporary worktree removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
