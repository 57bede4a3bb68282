"""The code version of a stage: a hash of the source files it runs.

Prefect's TASK_SOURCE policy hashes only a task's own text and misses the helpers it calls
(PrefectHQ/prefect#23062). Here the code version is the closure of project modules a stage
imports, found by reading ``import`` statements (also those inside functions): the stage's
task module, the method's module and every ``components`` and ``tasks`` module they reach.
Editing any of those files reruns the stage (and, through the input digests, everything
downstream); editing an unrelated method's file does not.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FOLLOWED_PACKAGES = ("components", "tasks")


@lru_cache(maxsize=None)
def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # `from pkg.mod import attr`: pkg.mod.attr is not a module
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


@lru_cache(maxsize=None)  # a closure per stage shares most files: parse each once per process
def _imported_modules(path: Path, module_name: str) -> frozenset[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            # `from components.data import schema` imports a submodule, not an attribute
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return frozenset(m for m in found if m.split(".")[0] in FOLLOWED_PACKAGES)


@lru_cache(maxsize=None)
def source_closure(module_names: tuple[str, ...]) -> tuple[Path, ...]:
    """Every project source file reachable from ``module_names`` through imports."""
    seen: dict[str, Path] = {}
    stack = list(module_names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        stack.extend(_imported_modules(path, name))
    return tuple(sorted(set(seen.values())))


def source_bytes(path: Path) -> bytes:
    return path.read_bytes()


def code_version(files: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for path in files:
        rel = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
        h.update(str(rel).encode() + b"\0" + source_bytes(path) + b"\0")
    return h.hexdigest()


def relative_paths(files: tuple[Path, ...]) -> list[str]:
    return [str(p.relative_to(PROJECT_ROOT)) if p.is_relative_to(PROJECT_ROOT) else str(p) for p in files]
