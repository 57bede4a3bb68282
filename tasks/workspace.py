"""Where a project's state lives: artifacts, the MLflow database, Prefect's home.

Everything defaults to embedded, local state under the workspace root (the directory that
holds ``params/``), so a laptop with no network and no servers works out of the box.
``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` switch to servers without changing recipes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tasks.artifacts import ArtifactStore
from tasks.diskspace import ensure_reserve


class WorkspaceError(OSError):
    """The workspace cannot hold paperdag's state (read-only, missing, full disk)."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> "Workspace":
        return cls(Path(root or os.environ.get("PAPERDAG_WORKSPACE") or os.getcwd()).resolve())

    @property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.root / "artifacts", self.state_dir)

    @property
    def state_dir(self) -> Path:
        return self.root / ".paperdag"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.state_dir / "mlartifacts"

    def check_writable(self) -> None:
        """Fail in one line, before Prefect or MLflow start, if the workspace cannot be written.

        Without this a read-only workspace surfaced as a Prefect server start-up timeout after
        two minutes and dozens of tracebacks."""
        for directory in (self.root, self.state_dir, self.root / "artifacts"):
            probe = directory / f".paperdag-write-probe-{os.getpid()}"
            try:
                directory.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise WorkspaceError(
                    f"workspace {self.root} is not writable: {e.strerror} ({directory}); paperdag keeps its "
                    f"artifacts and state there. Fix its permissions or pass --workspace DIR") from None
        ensure_reserve(self.state_dir)

    def configure_environment(self) -> None:
        """Set the embedded defaults before Prefect or MLflow are imported."""
        os.environ.setdefault("PREFECT_HOME", str(self.state_dir / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        os.environ.setdefault("DVC_NO_ANALYTICS", "1")
        # MLflow's HTTP client retries 7 times with backoff by default: over four minutes before a
        # down tracking server is reported. Start-up checks the server in seconds (tracking.py);
        # these bound an outage in the middle of a run.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        # the client prints "View run ... at: URL" twice per ended run against a server, between a
        # stage's name and its result; the CLI prints the lineage address once, at the end
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # per-tensor loading bars and advisory warnings drown the stage progress on tiny models
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # DeepSpeed picks its CPU accelerator without CUDA, but says so in a WARNING line on every
        # stage; preset it where no NVIDIA device exists. Checked without importing torch (seconds),
        # so commands that only look (list, show, lineage) stay fast.
        if not _nvidia_device_present():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _nvidia_device_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists()  # /dev/dxg: CUDA under WSL
