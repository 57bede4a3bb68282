"""Look at a workspace without running anything: what a recipe would do (``status``), one
artifact (``show``), copying one out (``export``), and removing what no recipe references (``gc``).

Nothing here imports torch or starts Prefect. ``status`` reads manifests only (no hashing, no
quarantine: a look must not change the workspace); a run still verifies every hit it serves.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from tasks.artifacts import DIGEST_LEN, STAGE_METRICS, Artifact, read_manifest
from tasks.plan import RecipePlan
from tasks.workspace import Workspace


class InspectTargetError(ValueError):
    """``show``/``export`` named no artifact, or ``export``/``gc`` cannot proceed safely."""


# -- status -------------------------------------------------------------------------------------
def built(ws: Workspace, kind: str, digest: str) -> Artifact | None:
    """The artifact if a complete one with this digest exists (its manifest read, no hashing)."""
    path = ws.artifacts.path_for(kind, digest)
    if not path.is_dir():
        return None
    manifest, problem = read_manifest(path)
    return Artifact(path, manifest, ws.artifacts) if problem is None and manifest.get("digest") == digest else None


def stage_status(plan: RecipePlan, ws: Workspace, order: list[str], forced: set[str]) -> list[dict]:
    rows = []
    for name in plan.stages:
        s = plan.stages[name]
        art = built(ws, s.kind, s.digest)
        selected = name in order
        rows.append({
            "stage": name, "kind": s.kind, "method": s.method, "digest": s.digest, "upstream": s.upstream,
            "cached": art is not None, "path": str(ws.artifacts.path_for(s.kind, s.digest)),
            "would_run": selected and (art is None or name in forced),
            "why": ("forced by --only/--from" if name in forced else "not built" if art is None else "")
            if selected else "not selected",
        })
    return rows


def missing_inputs(plan: RecipePlan, ws: Workspace, order: list[str]) -> list[tuple[str, str]]:
    """(stage, upstream) pairs where a selected stage reads an upstream stage that is neither
    selected nor built: a ``--only`` run would stop there, so it is refused before it starts."""
    selected = set(order)
    return [(name, up) for name in order for up in plan.stages[name].upstream
            if up not in selected and built(ws, plan.stages[up].kind, plan.stages[up].digest) is None]


def print_status(plan: RecipePlan, rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"recipe": plan.name, "recipe_path": str(plan.recipe_path), "stages": rows,
                          "would_run": [r["stage"] for r in rows if r["would_run"]]}, indent=2))
        return
    width = max(len(r["stage"]) for r in rows)
    for r in rows:
        state = f"would run ({r['why']})" if r["would_run"] else "cached" if r["cached"] else r["why"]
        print(f"  {r['stage']:<{width}}  {r['kind']:<9} {r['method']:<18} {r['digest'][:DIGEST_LEN]}  {state}")
    todo = [r["stage"] for r in rows if r["would_run"]]
    print(f"{plan.name}: {len(rows)} stages, {sum(r['cached'] for r in rows)} cached; "
          + (f"a run would compute {len(todo)}: {', '.join(todo)}" if todo else "a run would compute nothing"))


# -- show / export ------------------------------------------------------------------------------
def resolve_artifact(ws: Workspace, ref: str) -> Artifact:
    """``ref`` is a digest (prefix of at least 4 characters) or ``RECIPE:STAGE``."""
    if ":" in ref:
        from flows.plan_cache import compiled_plan
        from flows.recipe_path import resolve_recipe_path

        recipe, stage = ref.rsplit(":", 1)
        plan, _ = compiled_plan(resolve_recipe_path(recipe, ws.root))
        if stage not in plan.stages:
            raise InspectTargetError(f"recipe {plan.name} has no stage {stage!r}; stages: {', '.join(plan.stages)}")
        s = plan.stages[stage]
        art = built(ws, s.kind, s.digest)
        if art is None:
            raise InspectTargetError(f"{ref}: stage {stage} (digest {s.digest[:DIGEST_LEN]}) has no artifact in "
                                     f"{ws.root}; run `paperdag run {plan.name} --only {stage}`")
        return art
    if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref):
        raise InspectTargetError(f"{ref!r} is neither an artifact digest (4 or more hex characters) nor RECIPE:STAGE")
    art = ws.artifacts.find(ref)
    if art is None:
        raise InspectTargetError(f"no artifact in {ws.root / 'artifacts'} has a digest starting with {ref!r}; "
                                 "`paperdag status RECIPE` lists a recipe's digests")
    return art


def artifact_summary(art: Artifact) -> dict:
    manifest = dict(art.manifest)
    files = manifest.pop("files", {})
    metrics_file = art.path / STAGE_METRICS
    return {"path": str(art.path), **manifest, "files": len(files),
            "bytes": sum(f["bytes"] for f in files.values()),
            "metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else {}}


def print_artifact(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    head = ("stage", "recipe", "kind", "method", "digest", "path", "created", "mlflow_run_id", "files", "bytes")
    for key in head:
        if key in summary:
            print(f"{key + ':':<15}{summary[key]}")
    for role, digests in sorted(summary.get("inputs", {}).items()):
        print(f"{'input ' + role + ':':<15}{', '.join(d[:DIGEST_LEN] for d in digests)}")
    for section in ("facts", "metrics"):
        values = summary.get(section) or {}
        if values:
            print(f"{section}:")
            for k, v in values.items():
                text = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
                print(f"  {k}: {text if len(text) <= 100 else text[:97] + '...'}")


EXPORT_FORMATS = ("copy", "compressed-tensors")


def export(ws: Workspace, ref: str, dest: Path, fmt: str = "copy") -> Path:
    """Write an artifact (re-hashed first) to ``dest``, which must not exist; all or nothing.

    ``copy`` copies the artifact as it is (a quantize artifact loads as fp32 weights);
    ``compressed-tensors`` writes a quantize artifact's codes in the format transformers loads
    as quantized (tasks/export_compressed.py)."""
    if fmt not in EXPORT_FORMATS:
        raise InspectTargetError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    art = resolve_artifact(ws, ref)
    dest = dest.resolve()
    if dest.exists() or dest.is_symlink():
        raise InspectTargetError(f"export path {dest} already exists; choose a new path or remove it first")
    if not dest.parent.is_dir():
        raise InspectTargetError(f"export path {dest}: its parent directory {dest.parent} does not exist")
    art.verify(full=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if fmt == "copy":
            shutil.copytree(art.path, tmp)
        else:
            from tasks.export_compressed import ExportFormatError, export_compressed_tensors

            try:
                export_compressed_tensors(art.path, tmp)
            except ExportFormatError as e:
                raise InspectTargetError(f"cannot export {ref} as {fmt}: {e}") from None
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- gc -----------------------------------------------------------------------------------------
_held: list = []  # this process's shared hold on the workspace, while a command runs


def _activity_lock_path(ws: Workspace) -> Path:
    return ws.state_dir / "locks" / "workspace.lock"


def hold_workspace(ws: Workspace) -> None:
    """Mark this process as using the workspace (run, stage, serve), so `gc` waits for it.
    A shared ``flock``: many runs at once are fine, and it vanishes with the process."""
    path = _activity_lock_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_SH)
    _held.append(handle)


def release_workspace() -> None:
    while _held:
        _held.pop().close()  # closing the file drops its flock


@contextmanager
def exclusive_workspace(ws: Workspace):
    path = _activity_lock_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InspectTargetError(f"another paperdag process (run, stage or serve) is using {ws.root}; "
                                     "run gc when it has finished") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def referenced_digests(ws: Workspace) -> set[str]:
    """Every stage digest of every recipe in params/, as it compiles now. A recipe that does not
    compile stops gc: what it references cannot be known."""
    from flows.recipe import RecipeError, load_plan

    recipes = sorted((ws.root / "params").glob("*.yaml"))
    if not recipes:  # every artifact would look unreferenced
        raise InspectTargetError(f"{ws.root} has no recipes in params/, so gc cannot tell what is in use; run it "
                                 "inside the project, or pass --workspace DIR")
    found: set[str] = set()
    for path in recipes:
        try:
            _, plan = load_plan(path)
        except RecipeError as e:
            raise InspectTargetError(f"gc needs every recipe to compile, and {path} does not ({e}); fix or "
                                     "move it first") from None
        found |= {s.digest for s in plan.stages.values()}
    return found


def unreferenced(ws: Workspace, keep: set[str]) -> list[tuple[Path, int]]:
    out = []
    for path, manifest, problem in ws.artifacts.all():
        if problem is None and manifest.get("kind") == "model_eval" and manifest.get("inputs", {}).get("model") in keep:
            continue  # a per-model evaluation (tasks/eval_cache.py) lives as long as its model does
        if problem is None and manifest.get("digest") not in keep:
            out.append((path, sum(f.stat().st_size for f in path.rglob("*") if f.is_file())))
    return out


def gc(ws: Workspace, yes: bool, dry_run: bool) -> int:
    with exclusive_workspace(ws):
        doomed = unreferenced(ws, referenced_digests(ws))
        total = sum(size for _, size in doomed)
        for path, size in doomed:
            manifest = read_manifest(path)[0]
            print(f"  {path.relative_to(ws.root)}  {size / 1e6:8.2f} MB  "
                  f"({manifest.get('recipe', '?')}:{manifest.get('stage', '?')})")
        summary = f"{len(doomed)} artifacts that no recipe in {ws.root / 'params'} references, {total / 1e6:.2f} MB"
        if not doomed or dry_run:
            print(summary + ("" if doomed else "; nothing to remove"))
            return 0
        if not yes:
            if not sys.stdin.isatty():
                raise InspectTargetError(f"{summary}; not removing without confirmation: pass --yes")
            if input(f"{summary}. Remove them? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing removed")
                return 0
        trash = ws.state_dir / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        for path, _ in doomed:  # a rename first: an artifact is whole or gone, never half-deleted
            target = trash / f"{path.parent.name}-{path.name}-{uuid.uuid4().hex[:6]}"
            os.rename(path, target)
            shutil.rmtree(target, ignore_errors=True)
            (ws.state_dir / "verified" / f"{path.parent.name}-{path.name}.json").unlink(missing_ok=True)
        print(f"removed {summary}")
        return 0
