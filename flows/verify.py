"""``paperdag verify [RECIPE|DIGEST]``: re-hash every byte of the artifacts against their manifests.

A cache hit checks sizes and re-hashes the files whose stat changed; this re-hashes all of
them, so it also finds corruption that kept a file's size and times (a bad disk block, an
edit with its mtime and ctime put back). It only reads: a bad artifact is reported with the
command that rebuilds it, and the next run of its stage quarantines or replaces it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tasks.artifacts import Artifact, ArtifactCorruptError, read_manifest
from tasks.workspace import Workspace


class VerifyTargetError(LookupError):
    """Neither a recipe nor an artifact matches what ``paperdag verify`` was given."""


def _targets(ws: Workspace, ref: str | None) -> list[tuple[str, Path]]:
    """(label, artifact directory) to check; a recipe's unbuilt stages are listed as absent."""
    store = ws.artifacts
    if ref is None:
        return [(f"{p.parent.name}/{p.name}", p) for p, _, _ in store.all()]
    from flows.recipe import RecipeError, load_plan, resolve_recipe_path

    try:
        path = resolve_recipe_path(ref, ws.root)
    except RecipeError:
        path = None
    if path is not None:
        _, plan = load_plan(path)
        return [(f"{s.name} ({s.kind}/{s.digest[:16]})", store.path_for(s.kind, s.digest)) for s in plan.stages.values()]
    art = store.find(ref) if len(ref) >= 4 else None
    if art is None:
        raise VerifyTargetError(f"no recipe and no artifact matches {ref!r} in {ws.root}")
    return [(f"{art.path.parent.name}/{art.path.name}", art.path)]


def verify(ws: Workspace, ref: str | None) -> int:
    bad = checked = absent = 0
    for label, path in _targets(ws, ref):
        if not path.exists():
            absent += 1
            print(f"  absent   {label}")
            continue
        manifest, problem = read_manifest(path)
        if problem is not None:
            bad += 1
            print(f"  INVALID  {label}: {problem}; the next run of its stage moves it aside and rebuilds it")
            continue
        try:
            Artifact(path, manifest, ws.artifacts).verify(full=True)
        except ArtifactCorruptError as e:
            bad += 1
            print(f"  CORRUPT  {label}: {e}")
            continue
        checked += 1
        size = sum(meta["bytes"] for meta in manifest["files"].values())
        print(f"  ok       {label}  {len(manifest['files'])} files, {size / 1e6:.2f} MB")
    print(f"{checked} artifacts verified, {bad} bad" + (f", {absent} not built" if absent else ""))
    if bad:
        print(f"error: {bad} artifact(s) do not match their manifests", file=sys.stderr)
    return 1 if bad else 0
