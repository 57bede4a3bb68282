"""Content-addressed artifacts, written atomically and verified whenever they are served.

An artifact's digest is a hash of what *made* it: the stage kind, the method key, the
resolved params, the input artifacts' digests, the code version (a hash of the source files
the stage runs) and the content hashes of the local files it reads. It lives at
``artifacts/<kind>/<digest16>/``. Writers fill a temporary sibling directory and
``os.rename`` it into place only after ``manifest.json`` is written, so a directory at the
final path is complete: a crash or SIGKILL mid-write leaves only a ``.tmp-*`` directory,
which no reader looks at and the next writer removes.

Serving an artifact (a cache hit, or an input of a stage) checks it against its manifest:
- the manifest must exist, parse and name the expected digest; a directory without a valid
  manifest is moved aside to ``.paperdag/quarantine/`` and rebuilt;
- every file the manifest lists must exist with its recorded size, and a file whose
  ``(size, mtime, ctime, inode)`` differs from when it was last hashed is re-hashed. Any
  write to a file moves its ctime, so an edited file is always re-hashed. The stat records
  live in ``.paperdag/verified/`` (never inside the artifact, whose bytes DVC versions).
A mismatch is an :class:`ArtifactCorruptError` naming the file and the command that rebuilds
it. ``paperdag verify`` re-hashes every byte regardless of the stat records.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from components.failpoints import failpoint
from tasks.fingerprint import sha256_file, stat_key

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGE_METRICS = "stage_metrics.json"  # the metrics a stage logged, kept with its artifact
DIGEST_LEN = 16


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupt."""


class ArtifactCorruptError(ArtifactError):
    """A file of an artifact does not match its manifest."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def compute_digest(kind: str, method: str, params: dict, input_digests: dict, code_version: str,
                   file_digests: dict[str, str] | None = None) -> str:
    payload = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "method": method,
        "params": params,
        "inputs": input_digests,
        "code": code_version,
        "files": file_digests or {},
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def notice(message: str) -> None:
    """A one-line message to the user that is not an error (quarantine, waiting on a lock)."""
    print(f"paperdag: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Artifact:
    """A complete artifact on disk (its manifest parsed and its digest checked)."""

    path: Path
    manifest: dict
    store: "ArtifactStore | None" = None

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise ArtifactError(f"artifact {self.path} has no file {name!r}")
        return p

    def verify(self, full: bool = False) -> None:
        """Check every file against the manifest: sizes always, content where a file changed
        since it was last hashed (``full``: re-hash everything)."""
        stamps = {} if full or self.store is None else self.store._read_stamps(self)
        fresh = dict(stamps)
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            try:
                st = p.stat()
            except FileNotFoundError:
                raise self._corrupt(rel, "the file is missing") from None
            if st.st_size != meta["bytes"]:
                raise self._corrupt(rel, f"it has {st.st_size} bytes, the manifest says {meta['bytes']}")
            key = stat_key(st)
            if stamps.get(rel) != key:
                if sha256_file(p) != meta["sha256"]:
                    raise self._corrupt(rel, "its content does not match the manifest's sha256")
                fresh[rel] = key
        if self.store is not None and fresh != stamps:
            self.store._write_stamps(self, fresh)

    def _corrupt(self, rel: str, why: str) -> ArtifactCorruptError:
        recipe, stage = self.manifest.get("recipe"), self.manifest.get("stage")
        rebuild = (f"rebuild it with `paperdag run {recipe} --only {stage}`" if recipe and stage
                   else "delete the directory and rerun the stage that made it")
        return ArtifactCorruptError(f"artifact {self.path}: file {rel} is corrupt ({why}); {rebuild}")


class ArtifactStore:
    """``root/<kind>/<digest16>/`` directories, each complete or absent."""

    def __init__(self, root: Path, state_dir: Path | None = None):
        self.root = Path(root)
        self.state_dir = Path(state_dir) if state_dir is not None else self.root.parent / ".paperdag"

    def path_for(self, kind: str, digest: str) -> Path:
        return self.root / kind / digest[:DIGEST_LEN]

    def get(self, kind: str, digest: str, verify: bool = True) -> Artifact | None:
        """The artifact, checked against its manifest; None if absent (or just quarantined).

        Raises ArtifactCorruptError when a file does not match the manifest."""
        path = self.path_for(kind, digest)
        if not path.exists():
            return None
        manifest, problem = read_manifest(path)
        if problem is None and manifest.get("digest") != digest:
            problem = f"{MANIFEST} names digest {str(manifest.get('digest'))[:DIGEST_LEN]}, not {digest[:DIGEST_LEN]}"
        if problem is not None:
            self.quarantine(path, problem)
            return None
        art = Artifact(path, manifest, self)
        if verify:
            art.verify()
        return art

    def find(self, digest_prefix: str) -> Artifact | None:
        """Look an artifact up by (a prefix of) its digest, across kinds. Directories without a
        valid manifest are skipped (the next run of their stage quarantines them)."""
        prefix = digest_prefix[:DIGEST_LEN]
        for kind_dir in sorted(self.root.glob("*")):
            for cand in sorted(kind_dir.glob(prefix + "*")):
                if cand.name.startswith(".tmp-"):
                    continue
                manifest, problem = read_manifest(cand)
                if problem is None and str(manifest.get("digest", "")).startswith(digest_prefix):
                    return Artifact(cand, manifest, self)
        return None

    def all(self) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Every artifact directory: (path, manifest or None, problem or None)."""
        for kind_dir in sorted(p for p in self.root.glob("*") if p.is_dir()):
            for cand in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")):
                manifest, problem = read_manifest(cand)
                yield cand, manifest, problem

    def quarantine(self, path: Path, problem: str) -> Path:
        """Move a directory that is not a valid artifact out of the way, keeping it for a look."""
        target = self.state_dir / "quarantine" / f"{path.parent.name}-{path.name}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.move(str(path), str(target))
        notice(f"{path} is not a valid artifact ({problem}); moved it to {target} and it will be rebuilt")
        return target

    # -- locks ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, kind: str, digest: str, what: str = "") -> Iterator[None]:
        """Exclusive while one process builds this digest; a second builder waits, then finds
        the artifact complete. ``flock`` locks vanish with their process, even on SIGKILL."""
        path = self.state_dir / "locks" / f"{kind}-{digest[:DIGEST_LEN]}.lock"
        with file_lock(path, f"another process is building {what or kind} ({digest[:12]})"):
            yield

    # -- stat records of the last successful hash of each file ------------------------------
    def _stamp_path(self, art: Artifact) -> Path:
        return self.state_dir / "verified" / f"{art.path.parent.name}-{art.path.name}.json"

    def _read_stamps(self, art: Artifact) -> dict[str, list[int]]:
        try:
            raw = json.loads(self._stamp_path(art).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict) or raw.get("digest") != art.digest or not isinstance(raw.get("files"), dict):
            return {}
        return raw["files"]

    def _write_stamps(self, art: Artifact, stamps: dict[str, list[int]]) -> None:
        target = self._stamp_path(art)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"digest": art.digest, "files": stamps}))
            os.replace(tmp, target)
        except OSError:
            pass  # a read-only state dir only means re-hashing next time

    # -- writing --------------------------------------------------------------------------
    @contextmanager
    def writer(self, kind: str, digest: str, manifest: dict, replace: bool = False) -> Iterator[Path]:
        """Yield a temp dir to fill; on success it is renamed to its final, content-addressed path.

        ``replace`` swaps out an existing artifact (a forced rerun); readers see either the old
        complete directory or the new one, never a partial one.
        """
        final = self.path_for(kind, digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps(final.parent)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            files, stamps = {}, {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    rel = str(p.relative_to(tmp))
                    files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                    stamps[rel] = stat_key(p.stat())
            content = hashlib.sha256(canonical_json(files).encode()).hexdigest()
            full = dict(manifest, digest=digest, schema_version=SCHEMA_VERSION, files=files,
                        content_sha256=content, created_unix=time.time())
            write_file_synced(tmp / MANIFEST, json.dumps(full, indent=2, sort_keys=True, default=str))
            problem = read_manifest(final)[1] if final.exists() and not replace else None
            if problem is not None:  # a directory that is not an artifact sits in the way
                self.quarantine(final, problem)
            if final.exists() and replace:
                trash = final.parent / f".tmp-old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            elif final.exists():  # a concurrent writer won the race; both are complete and equivalent
                shutil.rmtree(tmp)
                return
            else:
                failpoint("artifact-rename")
                os.rename(tmp, final)
            # a directory rename keeps every file's inode and times, so these stamps still hold
            self._write_stamps(Artifact(final, full, self), stamps)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _remove_stale_temps(parent: Path) -> None:
        for tmp in parent.glob(".tmp-*"):
            try:
                pid = int(tmp.name.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if not pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: Path) -> tuple[dict, str | None]:
    """(manifest, None) or ({}, what is wrong with it)."""
    manifest_path = path / MANIFEST
    try:
        text = manifest_path.read_text()
    except FileNotFoundError:
        return {}, f"{MANIFEST} is missing"
    except (OSError, UnicodeDecodeError) as e:
        return {}, f"{MANIFEST} cannot be read: {e}"
    try:
        manifest = json.loads(text)
    except ValueError as e:
        return {}, f"{MANIFEST} is not valid JSON ({e})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "digest" not in manifest:
        return {}, f"{MANIFEST} lacks its digest or file list"
    return manifest, None


def write_file_synced(path: Path, text: str) -> None:
    """Write and fsync, so the rename that publishes it never exposes an empty file after a crash."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def file_lock(path: Path, waiting_for: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; says once what it waits for if another holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            notice(f"waiting: {waiting_for}" + (f" (pid {holder})" if holder else ""))
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
