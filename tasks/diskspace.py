"""A full disk, recognised and survived.

ENOSPC reaches paperdag in several disguises: ``OSError`` from Python, ``RuntimeError:
[enforce fail at inline_container.cc] ... unexpected pos`` from ``torch.save``, and
``database or disk is full`` from SQLite. :func:`disk_full` sees through them.

With the disk full, MLflow cannot even record that a run failed, so runs were left RUNNING.
A workspace therefore keeps a small reserve file (``.paperdag/disk-reserve``, 1 MiB); on a
disk-full failure it is deleted so the failed and killed runs can be marked, and it is
re-created by the next run that finds space.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

RESERVE_BYTES = 1 << 20
NEARLY_FULL_BYTES = 256 << 10  # with less free than this, a write failure is a full disk
_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "file write failed",
                   "disk quota exceeded")
_TORCH_WRITE_FAILURE = ("inline_container", "pytorchstreamwriter")


def exception_chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from (``raise ... from None`` ends the chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(exc: BaseException, workspace: Path | None = None) -> str | None:
    """The path a disk-full failure was writing ('' if it does not say), or None if ``exc`` is
    not a full disk."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(e.filename or "")
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXT):
            return ""
        if workspace is not None and any(t in text for t in _TORCH_WRITE_FAILURE):
            free = free_bytes(workspace)
            if free is not None and free < NEARLY_FULL_BYTES:
                return ""
    return None


def ensure_reserve(state_dir: Path) -> None:
    reserve = Path(state_dir) / "disk-reserve"
    try:
        if not reserve.exists() or reserve.stat().st_size != RESERVE_BYTES:
            reserve.write_bytes(b"\0" * RESERVE_BYTES)
    except OSError:
        reserve.unlink(missing_ok=True)  # no room for it now; the next run tries again


def release_reserve(state_dir: Path) -> bool:
    reserve = Path(state_dir) / "disk-reserve"
    try:
        reserve.unlink()
        return True
    except OSError:
        return False
