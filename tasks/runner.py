"""The one stage entry point, shared by the Prefect flow and by ``dvc repro``.

``execute_stage`` looks the stage's digest up in the artifact store (a hit costs one stat),
otherwise resolves its inputs, runs the kind's task module into a temporary directory,
renames the finished artifact into place, and records the run in MLflow.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from components.failpoints import failpoint
from tasks.artifacts import STAGE_METRICS, Artifact, ArtifactError
from tasks.code_version import relative_paths
from tasks.plan import RecipePlan, StagePlan
from tasks.tracking import Tracker
from tasks.workspace import Workspace

# How a stage ran on its hardware (facts of train stages), also set as MLflow tags to filter runs by.
EXECUTION_TAGS = ("precision", "torch_compile", "attention")


class StageInputError(RuntimeError):
    """A stage's input artifact does not exist yet."""


@dataclass
class StageContext:
    """What a kind's ``run(ctx)`` gets: its plan, inputs, output dir and logging hooks."""

    plan: StagePlan
    recipe: RecipePlan
    workspace: Workspace
    out_dir: Path
    inputs: dict[str, list[Artifact]]
    log_metrics: Callable[[int, dict], None]
    progress: bool = True
    facts: dict = field(default_factory=dict)  # goes into the manifest (e.g. precision, rows)

    @cached_property
    def method(self):
        from tasks.kinds import KINDS

        cls = KINDS[self.plan.kind].registry.get(self.plan.method)
        return cls(cls.Params.model_validate(self.plan.params))

    def input(self, role: str) -> Artifact:
        arts = self.inputs.get(role) or []
        if len(arts) != 1:
            raise StageInputError(f"stage {self.plan.name}: expected exactly one {role!r} input, got {len(arts)}")
        return arts[0]


@dataclass
class StageOutcome:
    name: str
    kind: str
    digest: str
    path: Path
    cached: bool
    seconds: float
    metrics: dict
    run_id: str | None = None


def resolve_inputs(plan: RecipePlan, stage: StagePlan, ws: Workspace) -> dict[str, list[Artifact]]:
    store = ws.artifacts
    resolved: dict[str, list[Artifact]] = {}
    for role, names in stage.inputs.items():
        resolved[role] = []
        for upstream in names:
            up = plan.stages[upstream]
            art = store.get(up.kind, up.digest)
            if art is None:
                raise StageInputError(
                    f"stage {stage.name!r} needs input {role!r} from stage {upstream!r} "
                    f"(digest {up.digest[:16]}), which has no artifact yet; run "
                    f"`paperdag run {plan.name}` or `paperdag run {plan.name} --from {upstream}` first")
            resolved[role].append(art)
    return resolved


def stage_tags(plan: RecipePlan, stage: StagePlan, launcher: str) -> dict[str, str]:
    return {
        "paperdag.recipe": plan.name,
        "paperdag.stage": stage.name,
        "paperdag.kind": stage.kind,
        "paperdag.method": stage.method,
        "paperdag.artifact_digest": stage.digest,
        "paperdag.code_version": stage.code_version,
        "paperdag.launcher": launcher,
        "paperdag.input_digests": json.dumps(stage.input_digests, sort_keys=True),
    }


def execute_stage(
    plan: RecipePlan,
    name: str,
    ws: Workspace,
    tracker: Tracker | None = None,
    *,
    parent_run_id: str | None = None,
    force: bool = False,
    launcher: str = "prefect",
    progress: bool = True,
) -> StageOutcome:
    stage = plan.stages[name]
    store = ws.artifacts
    start = time.perf_counter()
    # A hit is served only after its files check out against the manifest (Artifact.verify).
    existing = None if force else store.get(stage.kind, stage.digest)
    if existing is not None:
        return _cache_hit(plan, stage, ws, existing, tracker, parent_run_id, launcher, start)
    with store.lock(stage.kind, stage.digest, f"stage {name}"):
        existing = None if force else store.get(stage.kind, stage.digest)
        if existing is not None:  # built by another process while this one waited
            return _cache_hit(plan, stage, ws, existing, tracker, parent_run_id, launcher, start)
        return _build(plan, stage, ws, tracker, parent_run_id, force, launcher, progress, start)


def _cache_hit(plan: RecipePlan, stage: StagePlan, ws: Workspace, existing: Artifact, tracker: Tracker | None,
               parent_run_id: str | None, launcher: str, start: float) -> StageOutcome:
    metrics = json.loads((existing.path / STAGE_METRICS).read_text()) if (existing.path / STAGE_METRICS).exists() else {}
    run_id = None
    if tracker is not None:
        tags = stage_tags(plan, stage, launcher) | {
            "paperdag.cache": "hit", "paperdag.artifact_path": str(existing.path),
            "paperdag.produced_by_run": existing.manifest.get("mlflow_run_id") or ""}
        with tracker.run(stage.name, tags, parent_run_id) as run_id:
            tracker.log_params(run_id, {"method": stage.method, "params": stage.params, "options": stage.options})
            tracker.log_input_artifacts(run_id, _existing_inputs(plan, stage, ws))
            tracker.log_metrics(run_id, metrics)
            log_evaluated_models(tracker, plan, stage, existing.path, run_id)
    return StageOutcome(stage.name, stage.kind, stage.digest, existing.path, True, time.perf_counter() - start,
                        metrics, run_id)


def _build(plan: RecipePlan, stage: StagePlan, ws: Workspace, tracker: Tracker | None, parent_run_id: str | None,
           force: bool, launcher: str, progress: bool, start: float) -> StageOutcome:
    name, store = stage.name, ws.artifacts
    inputs = resolve_inputs(plan, stage, ws)
    from tasks.kinds import KINDS  # the method registries (torch): a cache hit never needs them

    module = importlib.import_module(KINDS[stage.kind].task_module)
    manifest = {
        "stage": name,
        "recipe": plan.name,
        "kind": stage.kind,
        "method": stage.method,
        "params": stage.params,
        "options": stage.options,
        "inputs": stage.input_digests,
        "input_stages": stage.inputs,
        "code_version": stage.code_version,
        "code_files": relative_paths(stage.code_files),
        "input_files": stage.file_digests,
    }
    tags = stage_tags(plan, stage, launcher) | {"paperdag.cache": "miss",
                                                 "paperdag.artifact_path": str(store.path_for(stage.kind, stage.digest))}

    def run_into(run_id: str | None, log: Callable[[int, dict], None]) -> dict:
        with store.writer(stage.kind, stage.digest, manifest, replace=force) as tmp:
            ctx = StageContext(stage, plan, ws, tmp, inputs, log, progress)
            metrics = module.run(ctx) or {}
            (tmp / STAGE_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
            manifest.update(facts=ctx.facts, mlflow_run_id=run_id, git_commit=tracker.commit if tracker else None)
        return metrics

    if tracker is None:
        metrics = run_into(None, lambda step, m: None)
        run_id = None
    else:
        with tracker.run(name, tags, parent_run_id) as run_id:
            tracker.log_params(run_id, {"method": stage.method, "params": stage.params, "options": stage.options})
            tracker.log_input_artifacts(run_id, inputs)
            metrics = run_into(run_id, tracker.step_logger(run_id))
            failpoint("mlflow-log")
            tracker.log_metrics(run_id, metrics)
            final = store.get(stage.kind, stage.digest)
            facts = final.manifest.get("facts", {})
            tracker.set_tags(run_id, {"paperdag.facts": json.dumps(facts, default=str)[:5000],
                                      **{f"paperdag.{key}": str(facts[key]) for key in EXECUTION_TAGS if key in facts}})
            for small in ("metrics.json", "report.md", "report.html", STAGE_METRICS, "paperdag.json", "manifest.json"):
                if (final.path / small).exists():
                    tracker.log_file(run_id, final.path / small)
            for png in sorted(final.path.glob("*.png")):
                tracker.log_file(run_id, png)
            log_evaluated_models(tracker, plan, stage, final.path, run_id)
    final = store.get(stage.kind, stage.digest)
    if final is None:
        raise ArtifactError(f"stage {name}: artifact missing after a successful run")
    return StageOutcome(name, stage.kind, stage.digest, final.path, False, time.perf_counter() - start, metrics, run_id)


def log_evaluated_models(tracker: Tracker, plan: RecipePlan, stage: StagePlan, artifact: Path, run_id: str) -> None:
    """One child run per evaluated model under the evaluate run, with that model's metrics under
    the same keys (ppl_code, size_bytes, ...), so MLflow's compare view lines models up."""
    metrics_file = artifact / "metrics.json"
    if stage.kind != "evaluate" or not metrics_file.exists():
        return
    models = json.loads(metrics_file.read_text()).get("models", {})
    for model, values in models.items():
        source = plan.stages.get(model)
        tags = {"paperdag.role": "evaluated_model", "paperdag.recipe": plan.name, "paperdag.model": model,
                "paperdag.evaluate_stage": stage.name, "paperdag.evaluate_digest": stage.digest,
                **({"paperdag.model_digest": source.digest, "paperdag.kind": source.kind,
                    "paperdag.method": source.method} if source is not None else {})}
        with tracker.run(f"{stage.name}:{model}", tags, run_id) as child:
            tracker.log_metrics(child, values)


def _existing_inputs(plan: RecipePlan, stage: StagePlan, ws: Workspace) -> dict[str, list[Artifact]]:
    try:
        return resolve_inputs(plan, stage, ws)
    except StageInputError:
        return {}

