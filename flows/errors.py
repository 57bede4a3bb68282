"""How the CLI reports what went wrong: one line and an exit code, tracebacks only on request.

- exit 2: the request was wrong (a recipe, an override, a stage selection, a verify target);
- exit 1: a stage failed, or the environment cannot run it (read-only workspace, full disk,
  unreachable servers);
- exit 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM.
"""
from __future__ import annotations

import errno
from pathlib import Path

from tasks.diskspace import disk_full, exception_chain, free_bytes
from tasks.tracking import TrackingServerError
from tasks.workspace import WorkspaceError


class RecipeError(ValueError):
    """A recipe (or an override of it) is invalid. The message names the file and key."""


class StageSelectionError(ValueError):
    """--only/--from name a stage the recipe does not have, or both are given."""


class DeploymentError(RuntimeError):
    """A deployment cannot be created: no persistent Prefect API, or a work pool of another type."""


class StageFailedError(RuntimeError):
    """A stage raised; carries its name so the CLI can say which one in one line."""

    def __init__(self, stage: str, kind: str, method: str, cause: BaseException, workspace: Path | None = None):
        super().__init__(f"stage {stage} ({kind}/{method}) failed: {describe(cause, workspace)}")
        self.stage, self.cause = stage, cause

    def __reduce__(self):  # from a worker process (--max-parallel): the message and stage, not the live cause
        return (StageFailedError._from_message, (str(self), self.stage))

    @classmethod
    def _from_message(cls, message: str, stage: str) -> "StageFailedError":
        error = cls.__new__(cls)
        RuntimeError.__init__(error, message)
        error.stage, error.cause = stage, None
        return error


class WorkerLostError(RuntimeError):
    """A worker process of ``--max-parallel`` died under its stage (a signal, the OOM killer)."""

    def __init__(self, stages: list[str], cause: BaseException):
        many = len(stages) > 1
        super().__init__(f"a worker process died while running {'stages' if many else 'stage'} {', '.join(stages)} "
                         f"({type(cause).__name__}: killed by a signal, or out of memory?); "
                         + ("their checkpoints are kept: rerun and they resume" if many
                            else "its checkpoints are kept: rerun and it resumes"))
        self.stages = stages


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an interruption so every run and temp dir is cleaned up like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def describe(exc: BaseException, workspace: Path | None = None) -> str:
    """``Type: message`` of a failure, with a full disk and a read-only file system named as such."""
    full = disk_full(exc, workspace)
    if full is not None:
        where = full or str(workspace or ".")
        free = free_bytes(Path(where))
        return (f"disk full: no space left on the device holding {where}"
                + (f" ({free / 1e6:.1f} MB free)" if free is not None else "")
                + "; free some space and rerun (finished stages stay cached)")
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return f"read-only file system: cannot write {e.filename or workspace}"
    if isinstance(exc, (WorkspaceError, TrackingServerError, ConnectionError, DeploymentError, WorkerLostError)):
        return str(exc)  # already says what is wrong and what to do
    return f"{type(exc).__name__}: {exc}"
