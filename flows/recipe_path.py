"""Which file a recipe name or path means, without importing torch or the method registries,
so a wrong name, a wrong directory or a read-only workspace is reported in a fraction of a
second rather than after the heavy imports."""
from __future__ import annotations

import re
from pathlib import Path

from flows.errors import RecipeError

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
RECIPE_SUFFIXES = (".yaml", ".yml")


def resolve_recipe_path(name_or_path: str, workspace: Path) -> Path:
    """A recipe name (``params/<name>.yaml``) or a path to a ``.yaml``/``.yml`` file.

    Nothing else is opened: a path without a YAML suffix is refused unread, so no error
    message can echo lines of a file that is not a recipe."""
    known = sorted(x.stem for x in (workspace / "params").glob("*.yaml")) if (workspace / "params").exists() else []
    p = Path(name_or_path)
    if p.suffix in RECIPE_SUFFIXES:
        for c in ([p] if p.is_absolute() else [p, workspace / p]):
            if c.is_file():
                return c.resolve()
        raise RecipeError(f"recipe file {name_or_path} does not exist")
    if IDENTIFIER.match(name_or_path):
        c = workspace / "params" / f"{name_or_path}.yaml"
        if c.is_file():
            return c.resolve()
        if not (workspace / "params").is_dir():
            raise RecipeError(f"{workspace} is not a paperdag project (it has no params/ directory), so there "
                              f"is no recipe {name_or_path!r}: run paperdag inside the project, or pass "
                              "--workspace DIR (or set PAPERDAG_WORKSPACE)")
        raise RecipeError(f"recipe {name_or_path!r} not found (looked in {workspace / 'params'}); "
                          f"known recipes: {', '.join(known) or '(none)'}")
    raise RecipeError(f"{name_or_path!r} is neither a recipe name ({', '.join(known) or 'none in params/'}) "
                      f"nor a path to a {'/'.join(RECIPE_SUFFIXES)} file")
