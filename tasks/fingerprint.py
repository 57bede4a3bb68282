"""Content hashes of the local files a stage reads: data sources, model directories, the stdlib.

A stage's digest must change when any input changes, and a data file is an input as much as
a param is. Hashing every byte on every ``paperdag`` call would be slow for large corpora, so a
hash is reused while the file's ``(size, mtime_ns, ctime_ns, inode)`` is unchanged, as git's
index does. Any write to a file moves its ctime, which a user cannot set back, so an edited
file is always re-hashed. Known hashes persist in ``$PAPERDAG_CACHE_DIR/file-hashes.json``
(default ``~/.cache/paperdag``): they are facts about this machine's files, not about one
workspace. The cache is an accelerator only; deleting it costs one re-hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

CACHE_FILE = "file-hashes.json"
_CHUNK = 1 << 20


class InputFileError(FileNotFoundError):
    """A local file a recipe names does not exist or cannot be read."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def stat_key(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes can have changed (ctime cannot be set by a user)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cache_dir() -> Path:
    return Path(os.environ.get("PAPERDAG_CACHE_DIR") or Path.home() / ".cache" / "paperdag")


class FileHasher:
    """sha256 of files and directory trees, with a stat-keyed cache that survives processes."""

    def __init__(self, cache_path: Path | None = None):
        self._cache_path = cache_path
        self._known: dict[str, tuple[list[int], str]] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    @property
    def cache_path(self) -> Path:
        return self._cache_path or cache_dir() / CACHE_FILE

    def _load(self) -> dict[str, tuple[list[int], str]]:
        if self._known is None:
            try:
                raw = json.loads(self.cache_path.read_text())
                self._known = {k: (list(v[0]), str(v[1])) for k, v in raw.items()}
            except (OSError, ValueError, TypeError, IndexError, AttributeError):
                self._known = {}  # absent or unreadable: start over, it is only an accelerator
        return self._known

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError as e:
            raise InputFileError(f"input file {path} cannot be read: {e.strerror}") from None
        key = stat_key(st)
        with self._lock:
            known = self._load().get(str(path))
        if known is not None and known[0] == key:
            return known[1]
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise InputFileError(f"input file {path} cannot be read: {e.strerror}") from None
        with self._lock:
            self._load()[str(path)] = (key, digest)
            self._dirty = True
        return digest

    def tree(self, root: Path) -> str:
        """One hash of a directory: every file's relative path and content, in sorted order."""
        root = Path(root).resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        return self.files(files, root)

    def files(self, files: list[Path], root: Path | None = None) -> str:
        h = hashlib.sha256()
        for p in files:
            name = p.relative_to(root).as_posix() if root is not None else p.name
            h.update(name.encode() + b"\0" + self.file(p).encode() + b"\0")
        return h.hexdigest()

    def path(self, path: Path) -> str:
        path = Path(path)
        if path.is_dir():
            return self.tree(path)
        if not path.exists():
            raise InputFileError(f"input file {path} does not exist")
        return self.file(path)

    def save(self) -> None:
        """Write known hashes back (atomically; a concurrent writer's entries may be lost, which
        only costs a re-hash)."""
        with self._lock:
            if not self._dirty or self._known is None:
                return
            target = self.cache_path
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._known))
                os.replace(tmp, target)
                self._dirty = False
            except OSError:
                pass  # a read-only home only loses the accelerator


HASHER = FileHasher()


def hash_inputs(inputs: dict[str, list[Path]]) -> dict[str, str]:
    """``{label: sha256}`` for each labelled group of files or directories a stage reads."""
    out = {}
    try:
        for label, paths in sorted(inputs.items()):
            try:
                if len(paths) == 1:
                    out[label] = HASHER.path(paths[0])
                else:
                    h = hashlib.sha256()
                    for p in paths:
                        h.update(HASHER.path(p).encode())
                    out[label] = h.hexdigest()
            except InputFileError as e:
                raise InputFileError(f"{label}: {e}") from None
    finally:
        HASHER.save()
    return out
