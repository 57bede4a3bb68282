"""A recipe as a Prefect flow: one task run per stage, in dependency order.

Caching is content addressing: a stage whose artifact digest already exists in the store is
a cache hit and finishes in a ``Cached`` state without running. The artifact store is the
cache (rather than Prefect's result store) because ``dvc repro`` writes the same artifacts:
whatever produced an artifact, both launchers see it, and a deleted artifact is recomputed
instead of being served from a stale cache record.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from flows.errors import StageFailedError, WorkerLostError
from flows.parallel import (
    Capacity,
    StagePacker,
    check_ray_capacity,
    check_stage_resources,
    interruptible_stage,
    stage_placement,
    stage_task_runner,
    stage_threads,
    stop_pool_workers,
    threads_per_stage,
)
from flows.plan_cache import compiled_plan
from flows.recipe_path import resolve_recipe_path
from flows.selection import stages_to_run  # noqa: F401  (the flow's own selection; torch-free for `status`)
from tasks.plan import RecipePlan
from tasks.runner import StageOutcome, execute_stage
from tasks.tracking import Tracker
from tasks.workspace import Workspace


@dataclass
class FlowSummary:
    recipe: str
    parent_run_id: str
    outcomes: list[StageOutcome] = field(default_factory=list)
    seconds: float = 0.0
    tracking_uri: str = ""


@task(name="stage", cache_policy=NO_CACHE, persist_result=False)
def run_stage(plan: RecipePlan, name: str, ws: Workspace, tracker: Tracker, parent_run_id: str,
              force: bool, progress: bool, index: str, one_line: bool = True):
    """One stage. ``one_line``: its start and end share a line (stages one after another);
    stages side by side print a ``started`` line and an end line each."""
    stage = plan.stages[name]
    head = f"{index} {name:<18} {stage.kind:<9} {stage.method:<16} {stage.digest[:12]} "
    print(head, end="" if one_line else "started\n", flush=True)
    end = "" if one_line else head
    try:
        with interruptible_stage(), stage_threads(stage.resources.get("threads")):
            outcome = execute_stage(plan, name, ws, tracker, parent_run_id=parent_run_id, force=force,
                                    progress=progress)
    except Exception as e:
        print(f"{end}failed", flush=True)
        raise StageFailedError(name, stage.kind, stage.method, e, ws.root) from e
    print(f"{end}{'cached' if outcome.cached else 'done'} in {outcome.seconds:.1f}s", flush=True)
    if outcome.cached:
        return Completed(name="Cached", message=f"artifact {outcome.digest[:16]} exists", data=outcome)
    return outcome


@flow(name="paperdag-recipe", log_prints=False, persist_result=False, validate_parameters=False)
def recipe_flow(recipe: str, overrides: list[str] | None = None, only: list[str] | None = None,
                from_stage: str | None = None, workspace: str | None = None, progress: bool = True,
                max_parallel: int = 1, runner: str = "process") -> FlowSummary:
    """``max_parallel`` > 1: independent stages run side by side on the flow's task runner
    (``flows.parallel``), or, for a flow on Prefect's thread runner (a deployment's, started from
    its entrypoint), on a ``runner`` (``process``, ``dask[:ADDRESS]``, ``ray[:ADDRESS]``) of their
    own; 1: one after another in this process."""
    ws = Workspace.from_env(workspace)
    ws.configure_environment()  # a worker's flow process did not come through the CLI that sets these
    path = resolve_recipe_path(recipe, ws.root)
    plan, _ = compiled_plan(path, overrides or [])  # a cached plan imports no method registry
    order, forced = stages_to_run(plan, only or [], from_stage)
    if max_parallel == 1 or ":" not in runner:  # stages run on this machine (a cluster places its own)
        check_stage_resources(plan, order, Capacity.local())
    tracker = Tracker(ws, plan.name)
    start = time.perf_counter()
    tags = {"paperdag.recipe": plan.name, "paperdag.recipe_path": str(path), "paperdag.role": "flow",
            "paperdag.overrides": " ".join(overrides or []), "paperdag.selection":
            (f"only={','.join(only)}" if only else f"from={from_stage}" if from_stage else "all")}
    # named by recipe and start time, so runs of one recipe tell apart in the MLflow run list
    tags.update(_prefect_link_tags())
    with tracker.run(f"{plan.name} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags) as parent_id:
        tracker.log_params(parent_id, {"recipe": plan.name, "overrides": overrides or [], "paper": plan.paper})
        summary = FlowSummary(plan.name, parent_id, tracking_uri=ws.tracking_uri)
        if max_parallel > 1:
            summary.outcomes = _run_side_by_side(plan, order, forced, ws, tracker, parent_id, max_parallel, runner)
        else:
            for i, name in enumerate(order, 1):
                outcome = run_stage.with_options(task_run_name=name)(
                    plan, name, ws, tracker, parent_id, name in forced, progress, f"[{i}/{len(order)}]")
                summary.outcomes.append(_outcome(outcome))
        summary.seconds = time.perf_counter() - start
        tracker.log_metrics(parent_id, {"wall_seconds": summary.seconds,
                                        "cache_hits": sum(o.cached for o in summary.outcomes),
                                        "stages_run": sum(not o.cached for o in summary.outcomes)})
    _report_to_prefect(summary, plan, tracker.experiment_id)
    return summary


def _outcome(result) -> StageOutcome:
    return result.result() if isinstance(result, State) else result  # a cache hit returns its `Cached` state


def _run_side_by_side(plan: RecipePlan, order: list[str], forced: set[str], ws: Workspace, tracker: Tracker,
                      parent_id: str, limit: int, runner: str) -> list[StageOutcome]:
    """Submit each stage once its upstream stages in ``order`` have finished, at most ``limit``
    at a time. After a failure nothing new starts; running stages finish (and stay cached),
    then the first failure is raised. Outcomes come back in ``order``."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    finished, failures = {}, []

    def dispatch(submit) -> None:
        try:
            _dispatch(plan, order, forced, ws, tracker, parent_id, limit, submit, finished, failures, runner)
        except KeyboardInterrupt:
            stop_pool_workers()
            raise

    flow_runner = FlowRunContext.get().task_runner
    if isinstance(flow_runner, ThreadPoolTaskRunner):
        # A deployment's flow starts from its entrypoint on Prefect's default thread runner. Stages
        # in threads would share torch's RNG and thread pool (not the bytes of a serial run), so
        # they get a runner of their own, as `paperdag run --max-parallel` gives the whole flow.
        with stage_task_runner(runner, limit) as own_runner:
            dispatch(own_runner.submit)
    else:
        dispatch(flow_runner.submit)
    if failures:
        raise failures[0]
    return [finished[name] for name in order]


def _dispatch(plan: RecipePlan, order: list[str], forced: set[str], ws: Workspace, tracker: Tracker,
              parent_id: str, limit: int, submit: Callable, finished: dict, failures: list,
              runner: str = "process") -> None:
    """``submit(task, parameters)``: a started Prefect task runner's, returning a future."""
    from prefect.futures import as_completed

    selected, waiting, running = set(order), list(order), {}
    index = {name: f"[{i}/{len(order)}]" for i, name in enumerate(order, 1)}
    default_threads = threads_per_stage(limit)
    # a cluster at an address places the stages itself (Ray by their resources); here only --max-parallel caps them
    packer = StagePacker(Capacity.local() if ":" not in runner else Capacity.unbounded(), default_threads)

    def cached(name: str) -> bool:  # where it runs, not whether: execute_stage verifies a hit itself
        stage = plan.stages[name]
        return name not in forced and ws.artifacts.get(stage.kind, stage.digest, verify=False) is not None

    if runner.startswith("ray"):  # the runner has connected: ask the cluster what its nodes hold
        import ray

        check_ray_capacity(plan, [n for n in order if not cached(n)], default_threads,
                           [node["Resources"] for node in ray.nodes() if node.get("Alive")])

    def ready(name: str) -> bool:
        return all(up in finished or up not in selected for up in plan.stages[name].upstream)

    while running or (waiting and not failures):
        for name in [n for n in waiting if ready(n)] if not failures else []:
            stage = plan.stages[name]
            task = run_stage.with_options(task_run_name=name)
            params = dict(plan=plan, name=name, ws=ws, tracker=tracker, parent_run_id=parent_id,
                          force=name in forced, progress=False, index=index[name])
            if cached(name):
                waiting.remove(name)
                try:  # a cache hit is served here, not worth a worker
                    finished[name] = _outcome(task(**params))
                except Exception as e:  # noqa: BLE001 - raised below, once the running stages are done
                    failures.append(e)
                    break
            elif len(running) < limit and packer.fits(stage.resources):
                waiting.remove(name)
                packer.take(name, stage.resources)
                with stage_placement(runner, stage.resources, default_threads):
                    running[submit(task, {**params, "one_line": False})] = name
        if not running:
            if waiting and not failures and not any(ready(n) for n in waiting):
                raise RuntimeError(f"stages {waiting} wait on stages that never ran")  # a bug, not a user error
            continue
        future = next(as_completed(list(running)))
        name = running.pop(future)
        running_now = sorted([name, *running.values()])  # what the pool held when this one ended
        packer.release(name)
        try:
            finished[name] = _outcome(future.result())
        except BrokenProcessPool as e:  # a worker died: every stage on the pool fails with this
            failures.append(WorkerLostError(running_now, e))
        except Exception as e:  # noqa: BLE001 - raised by the caller, once the running stages are done
            failures.append(e)


def _prefect_link_tags() -> dict[str, str]:
    """The Prefect flow run this MLflow run belongs to (id and UI address), as MLflow tags."""
    from prefect.runtime import deployment, flow_run

    tags = {"paperdag.prefect_flow_run_id": str(flow_run.id or "")}
    if flow_run.ui_url:
        tags["paperdag.prefect_flow_run_url"] = flow_run.ui_url
    if deployment.id:
        tags["paperdag.prefect_deployment"] = str(deployment.name)
    return tags


def _report_to_prefect(summary: FlowSummary, plan: RecipePlan, experiment_id: str) -> None:
    """A run started by a worker has no terminal: its results table, claims and MLflow run go
    to the flow run's log and a markdown artifact the Prefect UI shows."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import deployment

    from flows.report import mlflow_run_markdown, summary_text

    if not deployment.id:  # `paperdag run` prints the same text itself
        return
    text = summary_text(summary, plan)
    print("\n" + text, flush=True)  # the worker's console, like the stage lines
    get_run_logger().info("%s", text)  # the flow run's log in the Prefect UI
    mlflow_run = mlflow_run_markdown(summary.tracking_uri, experiment_id, summary.parent_run_id)
    create_markdown_artifact(key=f"paperdag-{plan.name.replace('_', '-')}", markdown=f"{mlflow_run}\n\n```\n{text}\n```",
                             description=f"paperdag {plan.name}: results and claims")

