"""Content-addressed artifacts, written atomically.

An artifact's digest is a hash of what *made* it: the stage kind, the method key, the
resolved params, the input artifacts' digests and the code version (a hash of the source
files the stage runs). It lives at ``artifacts/<kind>/<digest16>/``. Writers fill a
temporary sibling directory and ``os.rename`` it into place only after ``manifest.json`` is
written, so a directory at the final path is always complete: a crash or SIGKILL mid-write
leaves only a ``.tmp-*`` directory, which no reader looks at and the next run removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGE_METRICS = "stage_metrics.json"  # the metrics a stage logged, kept with its artifact
DIGEST_LEN = 16


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupt."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def compute_digest(kind: str, method: str, params: dict, input_digests: dict, code_version: str) -> str:
    payload = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "method": method,
        "params": params,
        "inputs": input_digests,
        "code": code_version,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A complete artifact on disk."""

    path: Path
    manifest: dict

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

    def verify(self) -> None:
        """Re-hash every file against the manifest (detects corruption after the write)."""
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            if not p.exists():
                raise ArtifactError(f"artifact {self.path}: file {rel} is missing")
            if p.stat().st_size != meta["bytes"] or file_sha256(p) != meta["sha256"]:
                raise ArtifactError(f"artifact {self.path}: file {rel} does not match its manifest digest (corrupt)")


class ArtifactStore:
    """``root/<kind>/<digest16>/`` directories, each complete or absent."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, kind: str, digest: str) -> Path:
        return self.root / kind / digest[:DIGEST_LEN]

    def get(self, kind: str, digest: str) -> Artifact | None:
        path = self.path_for(kind, digest)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("digest") != digest:
            raise ArtifactError(f"{path}: manifest digest {manifest.get('digest')} != expected {digest}")
        return Artifact(path, manifest)

    def find(self, digest_prefix: str) -> Artifact | None:
        """Look an artifact up by (a prefix of) its digest, across kinds."""
        prefix = digest_prefix[:DIGEST_LEN]
        for kind_dir in sorted(self.root.glob("*")):
            for cand in kind_dir.glob(prefix + "*"):
                if (cand / MANIFEST).exists() and not cand.name.startswith(".tmp-"):
                    manifest = json.loads((cand / MANIFEST).read_text())
                    if manifest["digest"].startswith(digest_prefix):
                        return Artifact(cand, manifest)
        return None

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
            files = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            content = hashlib.sha256(canonical_json(files).encode()).hexdigest()
            full = dict(manifest, digest=digest, schema_version=SCHEMA_VERSION, files=files,
                        content_sha256=content, created_unix=time.time())
            (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
            if final.exists() and replace:
                trash = final.parent / f".tmp-old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            elif final.exists():  # a concurrent writer won the race; both are complete and equivalent
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
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
