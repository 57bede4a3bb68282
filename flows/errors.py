"""How the CLI reports what went wrong: one line and an exit code, tracebacks only on request.

- exit 2: the request was wrong (a recipe, an override, a stage selection, a verify target);
- exit 1: a stage failed, or the environment cannot run it (read-only workspace, full disk,
  unreachable servers);
- exit 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path


class StageSelectionError(ValueError):
    """--only/--from name a stage the recipe does not have, or both are given."""


class StageFailedError(RuntimeError):
    """A stage raised; carries its name so the CLI can say which one in one line."""

    def __init__(self, stage: str, kind: str, method: str, cause: BaseException):
        super().__init__(f"stage {stage} ({kind}/{method}) failed: {describe(cause)}")
        self.stage, self.cause = stage, cause


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an interruption so every run and temp dir is cleaned up like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "file write failed",
                   "disk quota exceeded")


def disk_full_path(exc: BaseException) -> str | None:
    """The path a disk-full failure was writing (or '' if it does not say); None if not disk-full.

    torch.save reports ENOSPC as ``RuntimeError: [enforce fail at inline_container.cc] ... file
    write failed`` and SQLite as ``database or disk is full``, so the text is read as well."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(e.filename or "")
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return ""
    return None


def describe(exc: BaseException, workspace: Path | None = None) -> str:
    """``Type: message`` of a failure, with a full disk and a read-only file system named as such."""
    full = disk_full_path(exc)
    if full is not None:
        where = Path(full or workspace or ".")
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = f", {shutil.disk_usage(where).free / 1e6:.1f} MB free"
        except OSError:
            free = ""
        return (f"disk full: no space left on the device holding {full or where}{free}; free some space and "
                f"rerun (finished stages stay cached)")
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return f"read-only file system: cannot write {e.filename or workspace}"
    return f"{type(exc).__name__}: {exc}"
