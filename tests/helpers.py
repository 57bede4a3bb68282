"""Shared test helpers (importable as ``tests.helpers``)."""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NANO_RECIPE = REPO / "tests" / "recipes" / "nano.yaml"


def make_workspace(root: Path, recipes: dict[str, Path] | None = None) -> Path:
    """A project directory with params/ holding the given recipes (name -> source file)."""
    (root / "params").mkdir(parents=True, exist_ok=True)
    for name, src in (recipes if recipes is not None else {"nano": NANO_RECIPE}).items():
        shutil.copy(src, root / "params" / f"{name}.yaml")
    return root


def mlflow_client(workspace: Path):
    """A client on a workspace's default MLflow store (sqlite:///<ws>/mlflow.db)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
