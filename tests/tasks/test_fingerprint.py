"""Content hashes of input files: reused while a file is untouched, renewed on any write."""
from __future__ import annotations

import hashlib
import json

import pytest

from tasks.fingerprint import FileHasher, InputFileError


def test_a_same_size_edit_with_the_old_mtime_is_still_seen(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "aaaa"}\n')
    hasher = FileHasher(tmp_path / "cache.json")
    first = hasher.file(f)
    assert first == hashlib.sha256(f.read_bytes()).hexdigest()
    st = f.stat()
    f.write_text('{"text": "bbbb"}\n')  # same size
    import os

    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert hasher.file(f) == hashlib.sha256(f.read_bytes()).hexdigest() != first


def test_hashes_persist_and_a_damaged_cache_is_only_slower(tmp_path, monkeypatch):
    f = tmp_path / "data.bin"
    f.write_bytes(b"x" * 1000)
    cache = tmp_path / "cache.json"
    hasher = FileHasher(cache)
    digest = hasher.file(f)
    hasher.save()
    assert json.loads(cache.read_text())[str(f.resolve())][1] == digest
    reads = []
    monkeypatch.setattr("tasks.fingerprint.sha256_file", lambda p: reads.append(p) or "recomputed")
    assert FileHasher(cache).file(f) == digest and reads == []  # reused: the file is untouched
    cache.write_text("{not json")
    assert FileHasher(cache).file(f) == "recomputed" and len(reads) == 1


def test_a_directory_hash_covers_names_and_contents(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a.txt").write_text("1")
    (d / "b.txt").write_text("2")
    hasher = FileHasher(tmp_path / "cache.json")
    before = hasher.path(d)
    (d / "b.txt").rename(d / "c.txt")
    assert hasher.path(d) != before
    with pytest.raises(InputFileError, match="does not exist"):
        hasher.path(tmp_path / "missing.jsonl")
