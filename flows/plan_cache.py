"""Compiled recipe plans, cached, so that inspecting a recipe does not import torch.

Compiling a recipe validates every stage's params against its method's class, and those
classes live in modules that import torch, transformers and DeepSpeed: about 6 seconds before
``validate``, ``status``, ``list`` or ``show RECIPE:STAGE`` could print a line. A compiled plan
is a pure function of what this module fingerprints, so it is kept and reused:

- the recipe file and every file it includes (content hashes);
- the ``--set`` overrides, the working directory (relative paths in params) and, for every
  string in the stages' resolved params and options, whether a file of that name exists (a
  method may read a file only if it is there, e.g. review labels or a local checkpoint);
- all project code under ``flows/``, ``components/`` and ``tasks/`` (content hashes, not only
  the stage's import closure: a registry or validator anywhere can change what compiles), the
  Python version and the pydantic and PyYAML versions;
- the content of every local file a stage reads (corpus sources, checkpoints), rehashed on
  every use through the stat-keyed file-hash cache.

Any change misses, and the plan is compiled again the slow way. A recipe that does not compile
is never cached, so its error is always the compiler's own. The cache lives next to the
file-hash cache (``$PAPERDAG_CACHE_DIR``, default ``~/.cache/paperdag``), never in the project:
inspecting a recipe writes nothing to the workspace. Deleting it costs one slow compile.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pydantic
import yaml

from tasks import code_version  # its source_bytes: the one reader of source files, as for stage digests
from tasks.fingerprint import InputFileError, cache_dir, hash_inputs
from tasks.plan import RecipePlan, StagePlan

FORMAT = 1
CODE_PACKAGES = ("flows", "components", "tasks")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEEP = 256  # newest entries kept; a few kB each


def code_fingerprint(root: Path = PROJECT_ROOT, packages: tuple[str, ...] = CODE_PACKAGES) -> str:
    """sha256 over every ``.py`` file of the project's packages and the versions that parse recipes."""
    h = hashlib.sha256(f"{sys.version}\0{pydantic.VERSION}\0{yaml.__version__}\0".encode())
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + code_version.source_bytes(path) + b"\0")
    return h.hexdigest()


def _entry_path(recipe_path: Path, overrides: tuple[str, ...], code: str) -> Path:
    key = json.dumps([FORMAT, str(recipe_path.resolve()), list(overrides), os.getcwd(), code])
    return cache_dir() / "plans" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _strings(node) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, dict):
        return set().union(*map(_strings, node.values()), *map(_strings, node.keys())) if node else set()
    if isinstance(node, (list, tuple)):
        return set().union(*map(_strings, node)) if node else set()
    return set()


def _existing(strings: set[str]) -> list[str]:
    """The strings that name an existing file or directory (relative to the cwd)."""
    out = []
    for s in sorted(strings):
        try:
            if 0 < len(s) < 4096 and "\0" not in s and os.path.exists(s):
                out.append(s)
        except (OSError, ValueError):
            pass
    return out


def _file_hashes(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _plan_to_json(plan: RecipePlan) -> dict:
    stages = []
    for s in plan.stages.values():
        stages.append({**{k: getattr(s, k) for k in ("name", "kind", "method", "params", "options", "inputs",
                                                     "digest", "code_version", "input_digests", "file_digests",
                                                     "resources")},
                       "code_files": [str(p) for p in s.code_files],
                       "input_files": {label: [str(p) for p in paths] for label, paths in s.input_files.items()}})
    return {"name": plan.name, "recipe_path": str(plan.recipe_path), "stages": stages, "claims": plan.claims,
            "paper": plan.paper, "seed_copies": plan.seed_copies}


def _plan_from_json(data: dict) -> RecipePlan:
    stages = {}
    for s in data["stages"]:
        s = dict(s)
        s["code_files"] = tuple(Path(p) for p in s["code_files"])
        s["input_files"] = {label: [Path(p) for p in paths] for label, paths in s["input_files"].items()}
        stages[s["name"]] = StagePlan(**s)
    return RecipePlan(data["name"], Path(data["recipe_path"]), stages, data["claims"], data["paper"],
                      data["seed_copies"])


def listing(recipe) -> dict:
    """What ``paperdag list`` shows of a compiled recipe (its catalogue results are looked up fresh)."""
    claims = []
    for c in recipe.claims:
        control = c.effective_control()
        claims.append({"name": c.name, "statement": c.statement, "kind": c.kind,
                       "control": (control.why or control.replace) if control else None})
    return {"name": recipe.name, "paper": {"title": recipe.paper.title, "url": recipe.paper.url},
            "stages": list(recipe.stages), "seeds": list(recipe.seeds or []), "claims": claims}


def _hash_group(label: str, paths: tuple[str, ...], hashed: dict) -> str:
    """One labelled group's content hash, once per ``hashed`` memo: `list` checks 36 recipes, and
    most read the same corpus sources (the stdlib corpus alone is thousands of files)."""
    if (label, paths) not in hashed:
        hashed[label, paths] = hash_inputs({label: [Path(p) for p in paths]})[label]
    return hashed[label, paths]


def _still_valid(entry: dict, hashed: dict) -> bool:
    try:
        if _file_hashes([Path(p) for p in entry["recipe_files"]]) != entry["recipe_files"]:
            return False
        if _existing(set(entry["strings"])) != entry["existing"]:
            return False
        for s in entry["plan"]["stages"]:
            if any(_hash_group(label, tuple(paths), hashed) != s["file_digests"].get(label)
                   for label, paths in s["input_files"].items()):
                return False
    except (OSError, InputFileError, KeyError, TypeError):
        return False
    return True


def _lookup(path: Path, hashed: dict) -> tuple[RecipePlan, dict] | None:
    """The cached ``(plan, listing)``, or None when there is none, it is stale or it is damaged."""
    try:
        entry = json.loads(path.read_text())
        if not (isinstance(entry, dict) and entry.get("format") == FORMAT and _still_valid(entry, hashed)):
            return None
        return _plan_from_json(entry["plan"]), dict(entry["listing"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(path: Path, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
        entries = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache directory only loses the speed-up


def compiled_plan(recipe_path: Path, overrides: list[str] | tuple[str, ...] = (),
                  hashed: dict | None = None) -> tuple[RecipePlan, dict]:
    """``(plan, listing)`` for a recipe file: from the cache when nothing it depends on changed,
    else compiled (importing the method registries) and cached. Errors are the compiler's.

    ``hashed``: a memo of input-file hashes to share between the recipes of one listing; files
    are re-read for every call without one."""
    recipe_path, overrides = Path(recipe_path).resolve(), tuple(overrides)
    path = _entry_path(recipe_path, overrides, code_fingerprint())
    cached = _lookup(path, {} if hashed is None else hashed)
    if cached is not None:
        return cached
    from flows.recipe import load_plan, recipe_files

    recipe, plan = load_plan(recipe_path, overrides)
    strings = _strings([[s.params, s.options] for s in plan.stages.values()])  # validated, defaults filled in
    entry = {"format": FORMAT, "recipe_files": _file_hashes(recipe_files(recipe_path)), "strings": sorted(strings),
             "existing": _existing(strings), "plan": _plan_to_json(plan), "listing": listing(recipe)}
    _store(path, entry)
    return plan, entry["listing"]
