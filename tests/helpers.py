"""Shared test helpers (importable as ``tests.helpers``)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(state: Path, port: int | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on loopback, its database and artifact store under ``state``;
    yields its URL once /health answers and stops it on exit. The same ``state`` and ``port``
    bring the same server back."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    state.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{state / 'server.db'}",
         "--artifacts-destination", str(state / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
