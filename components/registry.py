"""Closed, explicit registries: the only way a recipe can name code.

A recipe says ``method: rtn``; the stage's registry maps that key to a class. There is no
dotted-import escape hatch, so a recipe cannot run arbitrary code. Each entry carries the
paper it implements, so ``paperdag list`` and MLflow can show where a method comes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Iterable, TypeVar

from pydantic import BaseModel, ConfigDict


class UnknownMethodError(KeyError):
    """A recipe named a method that is not registered for its stage kind."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Paper:
    """Where a method comes from."""

    title: str
    url: str
    arxiv: str | None = None


class MethodParams(BaseModel):
    """Base for every method's params: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method:
    """Base of every registered component: a key, its paper and its typed params."""

    key: str = ""
    paper: Paper | None = None
    Params: type[MethodParams] = MethodParams

    def __init__(self, params: MethodParams | None = None):
        self.params = params if params is not None else self.Params()

    def input_files(self) -> dict[str, list[Path]]:
        """Local files or directories this method reads, by a label naming the recipe key.

        Their contents are hashed into the stage's digest, so editing one reruns the stage.
        Methods that read nothing from disk keep the default."""
        return {}


M = TypeVar("M", bound=type[Method])


class Registry(Generic[M]):
    """An explicit mapping from snake_case keys to method classes of one base class."""

    def __init__(self, kind: str, base: type[Method], entries: Iterable[type[Method]]):
        self.kind = kind
        self.base = base
        self._entries: dict[str, type[Method]] = {}
        for cls in entries:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"{kind} registry: {cls!r} is not a subclass of {base.__name__}")
            if not cls.key:
                raise ValueError(f"{kind} registry: {cls.__name__} has no `key`")
            if cls.key in self._entries:
                raise ValueError(f"{kind} registry: duplicate key {cls.key!r}")
            self._entries[cls.key] = cls

    def get(self, key: str) -> type[Method]:
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownMethodError(
                f"unknown {self.kind} method {key!r}; registered {self.kind} methods: {known}"
            ) from None

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def items(self):
        return sorted(self._entries.items())
