"""The run's own report: the critical path of the stages that ran."""
from __future__ import annotations

from pathlib import Path

from flows.pipeline import FlowSummary
from flows.recipe import load_plan
from flows.report import critical_path, summary_text
from tasks.runner import StageOutcome
from tests.helpers import REPO


def _plan():
    return load_plan(REPO / "tests" / "recipes" / "nano.yaml")[1]


def test_the_critical_path_is_the_chain_with_the_most_stage_time():
    plan = _plan()
    seconds = {"tokenize": 1.0, "pretrain_dense": 10.0, "pretrain_spdf": 12.0, "finetune_spdf": 3.0,
               "finetune_prose": 5.0, "finetune_code": 2.0, "merge": 1.0, "evaluate": 5.0}
    path, total = critical_path(plan, seconds)
    # pretrain_spdf is the longest stage, but dense -> finetune_prose -> merge holds more time in all
    assert path[-4:] == ["pretrain_dense", "finetune_prose", "merge", "evaluate"] and path[0] == "corpus"
    assert total == 1.0 + 10.0 + 5.0 + 1.0 + 5.0
    seconds["pretrain_spdf"] = 20.0
    assert critical_path(plan, seconds)[0][-3:] == ["pretrain_spdf", "finetune_spdf", "evaluate"]


def test_the_summary_names_the_critical_path_of_the_stages_that_ran_only():
    plan = _plan()

    def summary(ran: dict[str, float]) -> str:
        outcomes = [StageOutcome(name, plan.stages[name].kind, plan.stages[name].digest, Path("/nowhere"),
                                 name not in ran, ran.get(name, 0.0), {}) for name in plan.stages]
        return summary_text(FlowSummary("nano", "run0", outcomes, 30.0, "sqlite:///mlflow.db"), plan)

    text = summary({"pretrain_dense": 10.0, "quantize": 2.0, "pretrain_spdf": 3.0})
    assert "critical path: pretrain_dense -> quantize (12.0s of 15.0s stage time" in text
    assert "critical path" not in summary({}) and "critical path" not in summary({"quantize": 2.0})


def test_a_flow_runs_markdown_links_its_mlflow_run_on_a_server_and_names_a_local_store():
    from flows.report import mlflow_run_markdown

    assert mlflow_run_markdown("http://127.0.0.1:5000/", "3", "abc") == \
        "[MLflow run abc](http://127.0.0.1:5000/#/experiments/3/runs/abc)"
    local = mlflow_run_markdown("sqlite:////ws/mlflow.db", "3", "abc")
    assert "](" not in local and "`sqlite:////ws/mlflow.db`" in local and "`abc`" in local
