"""`paperdag deploy`: a recipe as a Prefect deployment on a process work pool.

The deployment points at this project directory (``flow.from_source``), so a `prefect worker`
on this machine, or on one that mounts the same project and workspace, runs the flow in a
subprocess whose working directory is the project: the same code, recipes and artifact store
as `paperdag run`.
"""
from __future__ import annotations

from pathlib import Path

from flows.errors import DeploymentError
from tasks.plan import RecipePlan
from tasks.workspace import Workspace

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLOW_ENTRYPOINT = "flows/pipeline.py:recipe_flow"


def ensure_process_pool(name: str) -> None:
    """Create the work pool as a process pool if it does not exist; refuse one of another type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            print(f"paperdag: created process work pool {name!r}")
            return
    if pool.type != "process":
        raise DeploymentError(f"work pool {name!r} is a {pool.type!r} pool; paperdag deploys to process pools "
                              "(the worker runs the flow from this project directory)")


def deployment_fields(plan: RecipePlan, recipe_path: Path, ws: Workspace, overrides: list[str],
                      max_parallel: int, runner: str) -> dict:
    """What every paperdag deployment (served or on a work pool) passes the flow and shows in the UI."""
    return {"parameters": {"recipe": str(recipe_path), "overrides": overrides, "workspace": str(ws.root),
                           "progress": False, "max_parallel": max_parallel, "runner": runner},
            "description": f"paperdag recipe {plan.name}: {plan.paper.get('title', '')}",
            "tags": ["paperdag", plan.name]}


def deploy_recipe(fields: dict, pool: str, name: str, cron: str | None) -> tuple[str, str]:
    """(deployment id, "flow/deployment" name) for ``deployment_fields``' flow on ``pool``."""
    from flows.pipeline import recipe_flow

    ensure_process_pool(pool)
    flow = recipe_flow.from_source(source=str(PROJECT_ROOT), entrypoint=FLOW_ENTRYPOINT)
    deployment_id = flow.deploy(name=name, work_pool_name=pool, cron=cron, build=False, push=False,
                                print_next_steps=False, **fields)
    return str(deployment_id), f"{recipe_flow.name}/{name}"
