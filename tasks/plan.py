"""A compiled stage: everything the runner needs, with its content digest already computed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str
    method: str
    params: dict  # resolved method params (defaults filled in), JSON-safe
    options: dict  # stage options outside the method: model preset, train_domain, seed, precision
    inputs: dict[str, list[str]]  # role -> upstream stage names
    digest: str
    code_files: tuple[Path, ...]
    code_version: str
    input_digests: dict[str, list[str]] = field(default_factory=dict)
    input_files: dict[str, list[Path]] = field(default_factory=dict)  # label -> local files it reads
    file_digests: dict[str, str] = field(default_factory=dict)  # label -> content hash (in the digest)
    resources: dict = field(default_factory=dict)  # threads, memory_gb, gpus, ranks: where it runs (ranks > 1 is in options)

    @property
    def upstream(self) -> list[str]:
        return sorted({s for names in self.inputs.values() for s in names})


@dataclass(frozen=True)
class RecipePlan:
    """A recipe compiled to a DAG of stages in topological order."""

    name: str
    recipe_path: Path
    stages: dict[str, StagePlan]  # insertion order is a topological order
    claims: list[dict]
    paper: dict
    seed_copies: dict[str, list[str]] = field(default_factory=dict)  # seed-dependent stage -> its per-seed copies

    def descendants(self, stage: str) -> set[str]:
        out: set[str] = set()
        frontier = {stage}
        while frontier:
            nxt = {s.name for s in self.stages.values() if set(s.upstream) & frontier} - out
            out |= nxt
            frontier = nxt
        return out

    def ancestors(self, stage: str) -> set[str]:
        out: set[str] = set()
        frontier = set(self.stages[stage].upstream)
        while frontier:
            out |= frontier
            frontier = {u for s in frontier for u in self.stages[s].upstream} - out
        return out
