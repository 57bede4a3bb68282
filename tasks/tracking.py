"""MLflow lineage: one experiment per recipe, a parent run per flow run, a child run per stage.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API, whose active-run
stack is global state that threads and nested flows trip over. Every run this module starts
is ended on every path out (FINISHED, FAILED or KILLED); runs left RUNNING by a process that
was SIGKILLed are marked KILLED by the next tracker that opens the experiment.

A tracking server that stops answering mid-run costs no computation: per-step metrics are
skipped while it is down (a gap in the curve), the stage's artifact is committed before its
final logging, and an end that cannot reach the server is written to
``.paperdag/tracking-journal.jsonl`` and replayed by the next tracker on that server, so the
run gets its real status and error instead of staying RUNNING.

A Ctrl-C never lands inside a write to a local (SQLite) store: cut there, SQLAlchemy leaves the
process's own transaction holding the database lock, and ending the run KILLED then waits out
the store's 20 s busy timeout and fails, leaving it RUNNING. Interruptions are deferred to the
end of each store call instead (``_interrupts_deferred``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from tasks.artifacts import file_lock, pid_alive
from tasks.diskspace import disk_full, release_reserve
from tasks.workspace import Workspace

MAX_PARAM_LEN = 6000
JOURNAL = "tracking-journal.jsonl"
STEP_LOG_PAUSE_S = 30.0  # after a failed per-step log, how long to skip them before trying again


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


def import_tracking_client(uri: str) -> None:
    """Import what ``Tracker`` needs for ``uri`` (MLflow and, for a local store, SQLAlchemy and
    alembic: seconds), so a caller can do it while it waits for something else."""
    import mlflow.entities  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    if not is_server(uri):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive during the block are held, then delivered to the handlers it
    found once it ends. A signal mask would not do: the kernel hands a process's signal to any
    thread not masking it, and Python runs the handler in the main thread all the same."""
    if threading.current_thread() is not threading.main_thread():  # only it runs and sets handlers
        yield
        return
    held: list[int] = []
    found = {sig: signal.getsignal(sig) for sig in _INTERRUPTS}
    for sig, handler in found.items():
        if handler is not None:  # None: a handler not set from Python, left alone
            signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in found.items():
            if handler is not None:
                signal.signal(sig, handler)
        for signum in held:
            signal.raise_signal(signum)


class _DeferringClient:
    """``MlflowClient`` whose every call to an in-process (SQLAlchemy) store finishes before a
    Ctrl-C is delivered. A call to a tracking server stays interruptible: the server finishes or
    drops the request itself, and a hung request must not make Ctrl-C wait for its timeouts."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def deferred(*args, **kwargs):
            with _interrupts_deferred():
                return attr(*args, **kwargs)

        return deferred


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
        self.uri = uri = workspace.tracking_uri
        check_tracking_server(uri)
        # a server that stops answering is named once by _reaching_server, not by a retry warning per request
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        # A new SQLite store is created by an alembic migration; two processes doing it at once
        # fail ("table ... already exists"). Whoever holds the lock creates it; others wait.
        db = _sqlite_path(uri)
        init_lock = file_lock(db.with_name(f".{db.name}.lock"), f"another process is creating {db}") if db \
            else nullcontext()
        with init_lock:
            client = MlflowClient(tracking_uri=uri)
            self.client = client if is_server(uri) else _DeferringClient(client)
            self._store_call = nullcontext if is_server(uri) else _interrupts_deferred
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
        self._replay_journal()
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

    @property
    def journal(self) -> Path:
        return self.workspace.state_dir / JOURNAL

    def _journal_lock(self):
        return file_lock(self.journal.with_name(f".{JOURNAL}.lock"), "another process is writing the tracking journal")

    def _journal_end(self, run_id: str, status: str, error: str) -> bool:
        """Record an end the store did not take; False if the journal cannot be written either."""
        entry = {"uri": self.uri, "run_id": run_id, "status": status, "error": error,
                 "end_time": int(time.time() * 1000)}
        try:
            with self._journal_lock(), open(self.journal, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            return True
        except OSError:
            return False

    def _replay_journal(self) -> None:
        """End the runs whose end could not reach this store before (a server outage), with the
        status, error and end time they had. Entries for other stores stay for their tracker."""
        from mlflow.exceptions import MlflowException

        if not self.journal.exists():
            return
        with self._journal_lock():
            keep = []
            for line in self.journal.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    uri, run_id, status, error, end_time = (entry[k] for k in ("uri", "run_id", "status", "error",
                                                                               "end_time"))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: the orphan check below still ends its run
                if uri != self.uri:
                    keep.append(line)
                    continue
                try:
                    run = self.client.get_run(run_id).info
                    if run.status == "RUNNING" and run.lifecycle_stage == "active":  # not ended or deleted since
                        if error:
                            self.client.set_tag(run_id, "paperdag.error", error)
                        self.client.set_terminated(run_id, status=status, end_time=end_time)
                except MlflowException as e:
                    if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code):  # a deleted run: nothing to end
                        keep.append(line)
            tmp = self.journal.with_name(f".{JOURNAL}.{os.getpid()}")
            tmp.write_text("".join(f"{line}\n" for line in keep))
            os.replace(tmp, self.journal)

    def _outage(self) -> str | None:
        """Why the tracking server does not answer now; None if it does, or the store is a file."""
        return unhealthy(self.uri) if is_server(self.uri) else None

    @contextmanager
    def _reaching_server(self, doing: str) -> Iterator[None]:
        """Name a tracking server that stopped answering, instead of MLflow's retry traceback."""
        try:
            yield
        except Exception as e:
            if (reason := self._outage()) is not None:
                raise TrackingServerError(
                    f"MLflow tracking server {self.uri} stopped answering ({reason}) while {doing}; "
                    "finished stages stay cached: rerun once it answers again") from e
            raise

    def step_logger(self, run_id: str) -> Callable[[int, dict], None]:
        """Per-step metrics of a running stage. A server outage must not cost the computation:
        while the server is down these are skipped (one warning; the curve in MLflow has a gap,
        final metrics are logged at the end) and tried again every STEP_LOG_PAUSE_S seconds."""
        paused_until = None

        def log(step: int, metrics: dict) -> None:
            nonlocal paused_until
            if paused_until is not None and time.monotonic() < paused_until:
                return
            try:
                self.log_metrics(run_id, metrics, step)
            except TrackingServerError as e:
                if paused_until is None:
                    print(f"warning: {str(e).split(';')[0]}; the stage goes on, its step metrics are skipped "
                          "until it answers", file=sys.stderr, flush=True)
                paused_until = time.monotonic() + STEP_LOG_PAUSE_S

        return log

    def _base_tags(self) -> dict[str, str]:
        return {"paperdag.host": socket.gethostname(), "paperdag.pid": str(os.getpid()),
                "mlflow.source.git.commit": self.commit, "paperdag.git_commit": self.commit}

    @contextmanager
    def run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> Iterator[str]:
        all_tags = {**self._base_tags(), **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = None
        try:
            with self._store_call():  # a Ctrl-C right after the run is created must still end it
                with self._reaching_server(f"starting run {name}"):
                    run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
                run_id = run.info.run_id
            yield run_id
        except BaseException as e:
            if run_id is None:  # no run was created
                raise
            if _is_interruption(e):
                self._end(run_id, "KILLED", "interrupted")
            else:
                self._end(run_id, "FAILED", f"{type(e).__name__}: {e}"[:5000])
            raise
        else:
            try:
                with self._reaching_server(f"ending run {name}"):
                    self.client.set_terminated(run_id, status="FINISHED")
            except TrackingServerError:
                self._journal_end(run_id, "FINISHED", "")
                raise

    def _end(self, run_id: str, status: str, error: str) -> None:
        """End a run on a failure path without hiding the failure. If the store cannot be
        written now, the end goes to the journal, replayed by the next tracker on this store;
        failing that (a full disk), the next tracker on this host marks the run KILLED."""
        for attempt in range(2):
            try:
                self.client.set_tag(run_id, "paperdag.error", error)
                self.client.set_terminated(run_id, status=status)
                return
            except Exception as e:  # noqa: BLE001 - the original exception is the one to report
                # a full disk: give SQLite the workspace's reserve and try once more
                if attempt == 0 and disk_full(e) is not None and release_reserve(self.workspace.state_dir):
                    continue
                reason = self._outage()
                cause = (f"tracking server {self.uri} does not answer ({reason})" if reason is not None
                         else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                later = (f"; recorded in {self.journal}, the next run against {self.uri} ends it"
                         if self._journal_end(run_id, status, error) else "")
                print(f"paperdag: could not mark MLflow run {run_id} {status}: {cause}{later}", file=sys.stderr)
                return

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v[:MAX_PARAM_LEN]) for k, v in sorted(flatten(params).items())]
        with self._reaching_server(f"logging the params of run {run_id}"):
            for i in range(0, len(flat), 100):
                self.client.log_batch(run_id, params=flat[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        with self._reaching_server(f"logging the metrics of run {run_id}"):
            for i in range(0, len(items), 500):
                self.client.log_batch(run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        with self._reaching_server(f"tagging run {run_id}"):
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
            with self._reaching_server(f"logging the inputs of run {run_id}"):
                self.client.log_inputs(run_id, datasets=entries)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        with self._reaching_server(f"uploading {path.name} to run {run_id}"):
            self.client.log_artifact(run_id, str(path), artifact_path)
