"""MLflow lineage: one experiment per recipe, a parent run per flow run, a child run per stage.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API, whose active-run
stack is global state that threads and nested flows trip over. Every run this module starts
is ended on every path out (FINISHED, FAILED or KILLED); runs left RUNNING by a process that
was SIGKILLed are marked KILLED by the next tracker that opens the experiment.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from tasks.artifacts import file_lock, pid_alive
from tasks.diskspace import disk_full, release_reserve
from tasks.workspace import Workspace

MAX_PARAM_LEN = 6000


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class TrackingServerError(ConnectionError):
    """The MLflow tracking server named by MLFLOW_TRACKING_URI does not answer."""


def unhealthy(base_url: str, timeout: float = 5.0) -> str | None:
    """Why ``<base_url>/health`` does not answer 200 within ``timeout`` (None if it does). One
    request, so a wrong or down server is reported in seconds rather than after client retries."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking_server(uri: str) -> None:
    if is_server(uri) and (reason := unhealthy(uri)) is not None:
        raise TrackingServerError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
                                  "MLFLOW_TRACKING_URI to track in the workspace's SQLite file")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _is_interruption(e: BaseException) -> bool:
    """Ctrl-C, or SIGTERM: inside a flow Prefect turns SIGTERM into its TerminationSignal (an
    ExternalSignal), matched by name so this module need not import Prefect."""
    return isinstance(e, KeyboardInterrupt) or any(c.__name__ == "ExternalSignal" for c in type(e).__mro__)


class Tracker:
    def __init__(self, workspace: Workspace, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        self.workspace = workspace
        self.experiment_name = experiment
        uri = workspace.tracking_uri
        check_tracking_server(uri)
        # A new SQLite store is created by an alembic migration; two processes doing it at once
        # fail ("table ... already exists"). Whoever holds the lock creates it; others wait.
        db = _sqlite_path(uri)
        init_lock = file_lock(db.with_name(f".{db.name}.lock"), f"another process is creating {db}") if db \
            else nullcontext()
        with init_lock:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None  # a tracking server keeps files in its own artifact store (--artifacts-destination)
                if not is_server(uri):  # the local store keeps them in the workspace
                    artifact_dir = (workspace.mlflow_artifact_root / experiment).resolve()
                    if not artifact_dir.is_relative_to(workspace.mlflow_artifact_root.resolve()):
                        raise ValueError(f"experiment name {experiment!r} would put MLflow files outside {workspace.root}")
                    workspace.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
                    location = artifact_dir.as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                except mlflow.exceptions.MlflowException:  # created concurrently by another process
                    self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                self.experiment_id = exp.experiment_id
        self.commit = git_commit(workspace.root)
        self._mark_orphans_killed()

    def __reduce__(self):
        """A stage in another process (``paperdag run --max-parallel``) opens its own client."""
        return (Tracker, (self.workspace, self.experiment_name))

    def _mark_orphans_killed(self) -> None:
        """Runs left RUNNING by a process on this host that no longer exists were killed."""
        host = socket.gethostname()
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500)
        for run in runs:
            tags = run.data.tags
            if tags.get("paperdag.host") == host and not pid_alive(int(tags.get("paperdag.pid", "0") or 0)):
                self._end(run.info.run_id, "KILLED", "process died without ending the run (killed)")

    def _base_tags(self) -> dict[str, str]:
        return {"paperdag.host": socket.gethostname(), "paperdag.pid": str(os.getpid()),
                "mlflow.source.git.commit": self.commit, "paperdag.git_commit": self.commit}

    @contextmanager
    def run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> Iterator[str]:
        all_tags = {**self._base_tags(), **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException as e:
            if _is_interruption(e):
                self._end(run_id, "KILLED", "interrupted")
            else:
                self._end(run_id, "FAILED", f"{type(e).__name__}: {e}"[:5000])
            raise
        else:
            self.client.set_terminated(run_id, status="FINISHED")

    def _end(self, run_id: str, status: str, error: str) -> None:
        """End a run on a failure path without hiding the failure: if the store cannot be
        written now (a full disk), the next tracker on this host marks the run KILLED."""
        for attempt in range(2):
            try:
                self.client.set_tag(run_id, "paperdag.error", error)
                self.client.set_terminated(run_id, status=status)
                return
            except Exception as e:  # noqa: BLE001 - the original exception is the one to report
                # a full disk: give SQLite the workspace's reserve and try once more
                if attempt == 0 and disk_full(e) is not None and release_reserve(self.workspace.state_dir):
                    continue
                print(f"paperdag: could not mark MLflow run {run_id} {status}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0]}", file=sys.stderr)
                return

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v[:MAX_PARAM_LEN]) for k, v in sorted(flatten(params).items())]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_input_artifacts(self, run_id: str, inputs: dict[str, list]) -> None:
        """``log_input`` for each upstream artifact: name, digest, source path, and role as context."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entries = []
        for role, artifacts in inputs.items():
            for art in artifacts:
                m = art.manifest
                producer = m.get("mlflow_run_id")  # the run that built it: follow the chain in the UI
                profile = {"rows": m.get("facts", {}).get("rows"), "content_sha256": m.get("content_sha256"),
                           "full_digest": m["digest"], "produced_by_run": producer}
                ds = Dataset(name=f"{m.get('stage', m['kind'])}:{m['kind']}", digest=m["digest"][:36],
                             source_type="local", source=json.dumps({"uri": art.path.as_uri()}),
                             schema=None, profile=json.dumps(profile))
                tags = [InputTag("mlflow.data.context", role)]
                if producer:
                    tags.append(InputTag("paperdag.produced_by_run", producer))
                entries.append(DatasetInput(ds, tags=tags))
        if entries:
            self.client.log_inputs(run_id, datasets=entries)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)
