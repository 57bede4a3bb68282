"""The whole nano DAG through real Prefect, MLflow, DeepSpeed and DVC, then every rerun mode.

The tests in this module share one workspace and run in file order: a cold run, a warm run,
a param change, a code change, --only, --from, lineage, and DVC.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.model.presets import PRESETS
from flows.cli import main
from flows.errors import RecipeError
from tasks.artifacts import DIGEST_LEN
from tasks.model_io import FACTS
from tests.helpers import REPO, make_workspace, mlflow_client, mlflow_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = make_workspace(tmp_path_factory.mktemp("e2e") / "ws")
    old = os.environ.get("PAPERDAG_WORKSPACE")
    os.environ["PAPERDAG_WORKSPACE"] = str(root)
    with prefect_test_harness(server_startup_timeout=180):
        yield root
    if old is None:
        os.environ.pop("PAPERDAG_WORKSPACE", None)
    else:
        os.environ["PAPERDAG_WORKSPACE"] = old


def _run(*args):
    from flows.pipeline import recipe_flow

    only = [a.split("=", 1)[1] for a in args if a.startswith("--only=")]
    from_stage = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")), None)
    overrides = [a.split("=", 1)[1] for a in args if a.startswith("--set=")]
    return recipe_flow("nano", overrides=overrides, only=only, from_stage=from_stage,
                       workspace=os.environ["PAPERDAG_WORKSPACE"], progress=False)


def _recomputed(summary) -> set[str]:
    return {o.name for o in summary.outcomes if not o.cached}


STAGES = {"corpus", "filter", "dedup", "tokenize", "pretrain_dense", "pretrain_spdf", "finetune_spdf",
          "finetune_prose", "finetune_code", "distill", "quantize", "merge", "evaluate"}


def test_cold_run_through_the_cli(ws, capsys):
    assert main(["run", "nano", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "13 stages, 0 cache hits" in out
    assert "claims:" in out and "[PASS (accounting)] spdf_fewer_flops" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{ws / 'mlflow.db'}" in out
    evaluate = next((ws / "artifacts" / "evaluate").iterdir())
    metrics = json.loads((evaluate / "metrics.json").read_text())
    figures = ("perplexity_by_domain.png", "size_vs_quality.png", "claims.png", "training_curves.png")
    assert all((evaluate / f).read_bytes()[:4] == b"\x89PNG" for f in figures)
    assert all(f"({f})" in (evaluate / "report.md").read_text() for f in figures)
    assert all(f'src="{f}"' in (evaluate / "report.html").read_text() for f in figures)
    # the bundled lm-eval task runs from the artifact: it names no build directory
    assert ".tmp-" not in (evaluate / "quantize" / "lm_eval_task" / "paperdag_arithmetic.yaml").read_text()
    assert set(metrics["models"]) == {"pretrain_dense", "pretrain_spdf", "finetune_spdf", "distill", "quantize", "merge"}
    for name, m in metrics["models"].items():
        assert m["ppl_all"] > 1 and 0 <= m["arith_exact_match"] <= 1 and m["arith_n"] == 8, name
    assert metrics["models"]["pretrain_spdf"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert metrics["models"]["finetune_spdf"]["sparsity"] < 0.01  # the dense fine-tune drops the mask
    assert metrics["models"]["quantize"]["bits_per_weight"] < 5
    # each trained model's loss curve, read from its artifact; quantized and merged models have none
    curves = metrics["training_curves"]
    assert set(curves) == {"pretrain_dense", "pretrain_spdf", "finetune_spdf", "distill"}
    assert curves["pretrain_dense"]["steps"] == list(range(1, 13))  # nano: 12 steps, one point each
    assert curves["pretrain_dense"]["loss"][-1] == pytest.approx(metrics["models"]["pretrain_dense"]["final_loss"],
                                                                 abs=1e-5)


def test_a_trained_model_names_its_tokenizers_special_ids(ws):
    """config.json said bos/eos 1/2 while the tokenizer used 0 for both."""
    from transformers import AutoTokenizer

    [pretrain] = [p for p in (ws / "artifacts" / "pretrain").iterdir()
                  if json.loads((p / "manifest.json").read_text())["stage"] == "pretrain_dense"]
    tokenizer = AutoTokenizer.from_pretrained(str(pretrain))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((pretrain / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
            (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 0), name


def test_the_task_that_launches_ranks_loads_no_teacher_and_builds_no_sampler(ws):
    """On the multi-rank path every rank builds its own teacher and sampler; the launching task
    keeps only what it saves: the starting model, the tokenizer and the parents' facts."""
    from flows.recipe import load_plan
    from tasks.kinds import KINDS
    from tasks.train import prepare_training
    from tasks.workspace import Workspace

    _, plan = load_plan(ws / "params" / "nano.yaml", ["stages.distill.sampler={method: rs2, params: {fraction: 0.5}}"])
    stage = plan.stages["distill"]  # its inputs are built; the sampler changes only its own digest
    store = Workspace.from_env(ws).artifacts
    inputs = {role: store.get(plan.stages[up].kind, plan.stages[up].digest) for role, [up] in stage.inputs.items()}
    cls = KINDS["distill"].registry.get(stage.method)
    full = prepare_training("distill", "distill", stage.method, stage.options, cls(cls.Params.model_validate(stage.params)),
                            inputs)
    light = prepare_training("distill", "distill", stage.method, stage.options,
                             cls(cls.Params.model_validate(stage.params)), inputs, launcher=True)
    assert full.teacher is not None and full.sampler.key == "rs2"
    assert light.teacher is None and light.sampler is None
    assert light.parents == full.parents and light.parents["teacher"]["method"] == "dense"
    assert all(torch_equal(a, b) for a, b in zip(light.model.state_dict().values(), full.model.state_dict().values()))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_mlflow_lineage_parent_child_inputs_and_tags(ws):
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("nano")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("paperdag.role") == "flow"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_name.startswith("nano 20")  # recipe and start time
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {c.data.tags["paperdag.stage"] for c in children} == STAGES
    assert all(r.info.status == "FINISHED" for r in runs)
    by_stage = {c.data.tags["paperdag.stage"]: c for c in children}
    for name, child in by_stage.items():
        tags = child.data.tags
        digest = tags["paperdag.artifact_digest"]
        assert (ws / "artifacts" / tags["paperdag.kind"] / digest[:16] / "manifest.json").exists()
        assert tags["paperdag.code_version"] and tags["paperdag.git_commit"]
        upstream = json.loads(tags["paperdag.input_digests"])
        logged = {d.dataset.digest for d in child.inputs.dataset_inputs}
        assert logged == {d[:36] for ds in upstream.values() for d in ds}, name
        for d in child.inputs.dataset_inputs:  # each input links to the run that built it
            producer = next(t.value for t in d.tags if t.key == "paperdag.produced_by_run")
            assert client.get_run(producer).data.tags["paperdag.artifact_digest"][:36] == d.dataset.digest
    # one child run per evaluated model, metrics under the same keys: MLflow's compare view
    evaluate_id = by_stage["evaluate"].info.run_id
    per_model = {r.data.tags["paperdag.model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate_id}
    metrics = json.loads((ws / "artifacts" / "evaluate" / by_stage["evaluate"].data.tags["paperdag.artifact_digest"][:16]
                          / "metrics.json").read_text())["models"]
    assert set(per_model) == set(metrics) and len(per_model) == 6
    for model, run in per_model.items():
        assert run.data.metrics["ppl_all"] == pytest.approx(metrics[model]["ppl_all"])
        assert run.data.tags["paperdag.model_digest"] == by_stage[model].data.tags["paperdag.artifact_digest"]
    assert by_stage["pretrain_dense"].data.metrics["train_flops"] > 0
    assert by_stage["pretrain_dense"].data.tags["paperdag.precision"] == "fp32"  # the nano recipe forces fp32
    assert by_stage["pretrain_dense"].data.tags["paperdag.torch_compile"] == "False"  # a tiny run: not worth it
    assert by_stage["pretrain_dense"].data.tags["paperdag.attention"] == "eager"  # CPU, short blocks
    assert "evaluate" in by_stage and by_stage["evaluate"].data.metrics["claims_total"] == 2
    logged = {a.path for a in client.list_artifacts(evaluate_id)}
    assert {"report.md", "report.html", "claims.png", "size_vs_quality.png"} <= logged, logged


def test_warm_run_is_all_cache_hits(ws):
    summary = _run()
    assert _recomputed(summary) == set()
    assert len(summary.outcomes) == len(STAGES)


def test_a_cached_run_through_the_cli_imports_no_torch(ws):
    """Every stage a hit: the plan comes from the plan cache and no stage's task module loads, so
    the run never imports torch, transformers or DeepSpeed (seconds each)."""
    code = ("import sys; from flows.cli import main; rc = main(['run', 'nano', '--no-progress']); "
            "print(rc, sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(),
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "13 stages, 13 cache hits" in done.stdout, done.stdout[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout[-3000:]


def _evaluations_reused(summary) -> int:
    evaluate = next(o for o in summary.outcomes if o.name == "evaluate")
    return json.loads((evaluate.path / "manifest.json").read_text())["facts"]["evaluations_reused"]


def test_param_change_recomputes_that_stage_and_downstream(ws):
    summary = _run("--set=stages.quantize.params.bits=8")
    assert _recomputed(summary) == {"quantize", "evaluate"}
    assert _evaluations_reused(summary) == 5  # the evaluate stage re-scores the one changed model


def test_code_change_recomputes_that_stage_and_downstream(ws, monkeypatch):
    """An edit to rtn.py, seen through the one function that reads source files (tests never
    write the checkout)."""
    import tasks.code_version

    edited = (REPO / "components" / "quant" / "rtn.py").resolve()
    read = tasks.code_version.source_bytes
    with monkeypatch.context() as m:
        m.setattr(tasks.code_version, "source_bytes",
                  lambda p: read(p) + (b"\n# an edit that changes the code version\n" if p == edited else b""))
        summary = _run()
    assert _recomputed(summary) == {"quantize", "evaluate"} and _evaluations_reused(summary) == 5
    assert _recomputed(_run()) == set()  # the original file has the original digests


def test_only_reruns_one_stage_on_cached_inputs(ws):
    before = {p: p.stat().st_mtime_ns for p in (ws / "artifacts").glob("*/*/manifest.json")}
    summary = _run("--only=quantize")
    assert [(o.name, o.cached) for o in summary.outcomes] == [("quantize", False)]
    after = {p: p.stat().st_mtime_ns for p in (ws / "artifacts").glob("*/*/manifest.json")}
    changed = {p.parent.parent.name for p in after if before.get(p) != after[p]}
    assert changed == {"quantize"}


def test_from_reruns_a_stage_and_everything_downstream(ws):
    summary = _run("--from=merge")
    assert _recomputed(summary) == {"merge", "evaluate"}
    assert len(summary.outcomes) == len(STAGES)


def test_lineage_from_run_id_and_digest(ws, capsys):
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("nano")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`paperdag.role` = 'flow'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert main(["lineage", parent.info.run_id]) == 0
    out = capsys.readouterr().out
    for stage in ("evaluate", "quantize", "pretrain_dense", "tokenize", "dedup", "filter", "corpus"):
        assert f"{stage} [" in out, stage
    digest = next((ws / "artifacts" / "quantize").iterdir()).name
    assert main(["lineage", digest]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("quantize [quantize/rtn]") and "corpus [corpus/standard_corpus]" in out
    assert main(["lineage", "ffffffffffff"]) == 1


def test_status_show_export_and_gc_look_without_running(ws, capsys, tmp_path):
    import fcntl

    import torch
    from transformers import AutoModelForCausalLM

    assert main(["status", "nano"]) == 0
    assert "nano: 13 stages, 13 cached; a run would compute nothing" in capsys.readouterr().out
    assert main(["status", "nano", "--only", "quantize", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["would_run"] == ["quantize"]
    assert main(["run", "nano", "--dry-run", "--from", "merge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["would_run"] == ["merge", "evaluate"]
    assert main(["status", "nano", "--set", "stages.quantize.params.bits=3"]) == 0
    assert "a run would compute 2: quantize, evaluate" in capsys.readouterr().out

    assert main(["show", "nano:quantize", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "quantize" and shown["stage"] == "quantize" and shown["metrics"]["bits"] == 4
    assert main(["show", shown["digest"][:8]]) == 0
    assert f"digest:        {shown['digest']}" in capsys.readouterr().out
    assert main(["show", "fffffff"]) == 2 and "no artifact" in capsys.readouterr().err
    assert main(["show", "nano:nothing"]) == 2 and "has no stage 'nothing'" in capsys.readouterr().err

    assert main(["export", "nano:quantize", str(tmp_path / "int4")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "int4")
    assert model.config.model_type == "llama"
    # the same model as compressed-tensors: transformers loads it quantized, with the same logits
    assert main(["export", "nano:quantize", str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert quantized.config.quantization_config.quant_method == "compressed-tensors"
    assert (tmp_path / "ct" / "model.safetensors").stat().st_size < 0.7 * (tmp_path / "int4" / "model.safetensors").stat().st_size
    ids = torch.arange(1, 17).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, model(ids).logits)
    assert main(["export", "nano:pretrain_dense", str(tmp_path / "dense_ct"), "--format", "compressed-tensors"]) == 2
    assert "not a quantized model artifact" in capsys.readouterr().err and not (tmp_path / "dense_ct").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    (tmp_path / "taken").mkdir()
    assert main(["export", "nano:quantize", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())

    assert main(["list", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["name"] == "nano" and entry["stages"][0] == "corpus"
    digest = shown["digest"]
    assert main(["lineage", digest, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["digest"] == digest and tree["inputs"][0]["stage"] == "pretrain_dense"
    assert main(["lineage", digest, "--depth", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["inputs_not_shown"] == 1

    # gc: the quantize and evaluate artifacts of the bits=8 and code-edit runs above belong to no
    # recipe, nor do the per-model evaluations of those two quantized models
    gc = lambda *a: subprocess.run([sys.executable, "-m", "flows.cli", "--workspace", str(ws), "gc", *a],
                                   capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    r = gc("--dry-run")
    orphans = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  artifacts/")]
    assert r.returncode == 0 and f"{len(orphans)} artifacts that no recipe" in r.stdout, r.stdout + r.stderr
    assert len(orphans) == 6 and {o.split("/")[1] for o in orphans} == {"quantize", "evaluate", "model_eval"}, orphans
    r = gc()
    assert r.returncode == 2 and "pass --yes" in r.stderr and all((ws / o).exists() for o in orphans)
    with open(ws / ".paperdag" / "locks" / "workspace.lock", "a+") as held:  # as a running `paperdag run` does
        fcntl.flock(held, fcntl.LOCK_SH)
        r = gc("--yes")
        assert r.returncode == 2 and "another paperdag process" in r.stderr, r.stdout + r.stderr
        assert all((ws / o).exists() for o in orphans)
    r = gc("--yes")
    assert r.returncode == 0 and not any((ws / o).exists() for o in orphans), r.stdout + r.stderr
    assert main(["status", "nano"]) == 0
    assert "13 cached" in capsys.readouterr().out


def _dvc_project(ws):
    """The workspace as a git clone of the project (its own .gitignore) with DVC initialised and
    dvc.yaml synced; returns a runner for commands in it. Safe to call again."""
    for d in ("components", "tasks"):  # dvc.yaml deps name the stage source files
        shutil.copytree(REPO / d, ws / d, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(REPO / ".gitignore", ws / ".gitignore")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run = lambda *cmd: subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert run("git", "init", "-q").returncode == 0
    if not (ws / ".dvc").exists():
        r = run("dvc", "init", "-q")
        assert r.returncode == 0, r.stderr
    assert main(["dvc-sync"]) == 0
    return run


def test_dvc_repro_reaches_the_same_artifacts(ws, capsys):
    """In a git clone as users have it (the project's own .gitignore): a Prefect run records
    what it built in dvc.lock, DVC then finds everything up to date, and `dvc repro -s` of a
    deleted artifact rebuilds the same bytes."""
    run = _dvc_project(ws)
    assert main(["dvc-sync", "--check"]) == 0
    capsys.readouterr()
    assert main(["run", "nano", "--no-progress"]) == 0  # all cache hits: only DVC's record is new
    assert "dvc: recorded 13 stages in dvc.lock" in capsys.readouterr().out
    assert main(["run", "nano", "--no-progress"]) == 0  # again: dvc.lock already records every artifact
    assert "dvc: recorded" not in capsys.readouterr().out  # no `dvc commit` (it re-hashed every artifact)
    assert run("git", "check-ignore", "-q", "dvc.lock").returncode == 1, "dvc.lock must not be git-ignored"
    r = run("dvc", "status")
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    r = run("dvc", "repro")
    assert r.returncode == 0 and "Running stage" not in r.stdout, r.stdout + r.stderr
    dvc_yaml = (ws / "dvc.yaml").read_text()
    manifests = {}
    for stage, kind in (("dedup", "select"), ("quantize", "quantize")):
        [art] = [p for p in (ws / "artifacts" / kind).iterdir() if f"artifacts/{kind}/{p.name}" in dvc_yaml
                 and json.loads((p / "manifest.json").read_text())["stage"] == stage]
        manifests[stage] = (art, json.loads((art / "manifest.json").read_text()))
        shutil.rmtree(art)
        r = run("dvc", "repro", "-s", f"nano-{stage}")
        assert r.returncode == 0 and "Running stage" in r.stdout, r.stdout + r.stderr
        again = json.loads((art / "manifest.json").read_text())
        assert again["digest"] == manifests[stage][1]["digest"]
        # the same stage entry point reproduces the same bytes, file by file
        assert again["files"] == manifests[stage][1]["files"], stage
        assert again["content_sha256"] == manifests[stage][1]["content_sha256"]
    r = run("dvc", "status", "nano-quantize")
    assert r.returncode == 0 and "changed" not in r.stdout, r.stdout


@pytest.mark.slow  # ~30 s of DVC and git subprocesses: the default suite's budget keeps the git-clone half above
def test_artifacts_round_trip_through_a_dvc_remote_into_a_second_clone(ws, capsys, tmp_path):
    """Artifacts round-trip through a DVC remote, a remote that cannot be written or is gone
    gives one clear error and leaves nothing half-made, and a second clone pulls them and reruns
    the recipe with every stage cached."""
    run = _dvc_project(ws)
    capsys.readouterr()
    assert main(["run", "nano", "--no-progress"]) == 0  # dvc.lock records every artifact (new or not)

    # no remote yet, then a remote that cannot be written (its parent is a file): one error, nothing made
    capsys.readouterr()
    assert main(["push"]) == 1
    assert "`dvc push` failed" in (err := capsys.readouterr().err) and "no remote specified" in err, err
    (tmp_path / "a-file").write_text("")
    assert run("dvc", "remote", "add", "broken", str(tmp_path / "a-file" / "remote")).returncode == 0
    assert main(["push", "--remote", "broken"]) == 1
    assert "Not a directory" in (err := capsys.readouterr().err) and str(tmp_path / "a-file") in err, err
    # a local-directory DVC remote: push, lose the artifacts and DVC's cache, pull them back
    assert run("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")).returncode == 0
    assert main(["push"]) == 0
    # the stages' artifacts travel; per-model evaluations are a local cache of the evaluate stage
    before = {p.parent.name: p.read_text() for p in (ws / "artifacts").glob("*/*/manifest.json")
              if p.parent.parent.name != "model_eval"}
    shutil.rmtree(ws / "artifacts")
    shutil.rmtree(ws / ".dvc" / "cache")
    # a remote that is gone: the error names it, and no artifact is left half-pulled
    assert run("dvc", "remote", "add", "gone", str(tmp_path / "no-such-remote")).returncode == 0
    capsys.readouterr()
    assert main(["pull", "--remote", "gone"]) == 1
    err = capsys.readouterr().err
    assert f"`dvc pull` failed with remote 'gone' ({tmp_path / 'no-such-remote'}, which does not exist)" in err, err
    assert not [p for p in (ws / "artifacts").glob("*/*") if not (p / "manifest.json").exists()]
    assert main(["pull"]) == 0
    after = {p.parent.name: p.read_text() for p in (ws / "artifacts").glob("*/*/manifest.json")}
    assert after == before
    capsys.readouterr()
    assert main(["status", "nano"]) == 0
    assert "13 cached; a run would compute nothing" in capsys.readouterr().out
    assert main(["verify", "nano"]) == 0  # every pulled byte matches its manifest

    # a second clone, as a teammate gets the project: git brings the recipes, dvc.yaml, dvc.lock and
    # the remote's address, `paperdag pull` the artifacts, and a run then computes nothing
    git = lambda *args: run("git", "-c", "user.name=paperdag", "-c", "user.email=paperdag@localhost", *args)
    assert git("add", "-A").returncode == 0
    assert git("commit", "-qm", "the project").returncode == 0
    clone = tmp_path / "clone"
    r = git("clone", "-q", str(ws), str(clone))
    assert r.returncode == 0 and not (clone / "artifacts").exists(), r.stderr
    # the teammate has a recipe of their own, never built anywhere: pull still brings what dvc.lock has
    (clone / "params" / "nano_mine.yaml").write_text(
        (clone / "params" / "nano.yaml").read_text().replace("name: nano", "name: nano_mine").replace("seed: 0", "seed: 7"))
    assert main(["--workspace", str(clone), "dvc-sync"]) == 0 and "nano_mine-pretrain_dense" in (clone / "dvc.yaml").read_text()
    assert main(["--workspace", str(clone), "pull"]) == 0
    assert len(list((clone / "artifacts").glob("*/*/manifest.json"))) == len(after)  # into the clone
    capsys.readouterr()
    assert main(["--workspace", str(clone), "run", "nano", "--no-progress"]) == 0
    assert "nano: 13 stages, 13 cache hits" in capsys.readouterr().out


def test_a_recipe_including_nano_adds_merges_that_train_and_measure(ws):
    """Grafting learns its mask on the fine-tune's own domain blocks, and group-wise merging
    measures every fine-tune on every domain, through the real merge stage; the included recipe
    shares nano's artifacts by digest."""
    (ws / "params" / "nano_merges.yaml").write_text(
        "include: [nano.yaml]\nname: nano_merges\nstages:\n"
        "  graft: {kind: merge, method: graft, inputs: {base: pretrain_dense, models: [finetune_prose], "
        "tokens: tokenize}, params: {density: 0.05, steps: 5}}\n"
        "  groupwise: {kind: merge, method: groupwise, inputs: {base: pretrain_dense, "
        "models: [finetune_prose, finetune_code], tokens: tokenize}}\n")
    from flows.recipe import load_plan

    _, nano = load_plan(ws / "params" / "nano.yaml")
    _, merges = load_plan(ws / "params" / "nano_merges.yaml")
    assert all(merges.stages[n].digest == s.digest for n, s in nano.stages.items() if n != "evaluate")
    for stage in ("graft", "groupwise"):
        assert main(["stage", "nano_merges", stage, "--no-progress"]) == 0, stage
    facts = {json.loads(m.read_text())["stage"]: json.loads((m.parent / "paperdag.json").read_text())
             for m in (ws / "artifacts" / "merge").glob("*/manifest.json")}
    graft = facts["graft"]["report"]
    assert 0 < graft["grafted_fraction"] <= 0.05 and graft["mask_loss_first"] > 0
    groupwise = facts["groupwise"]["report"]
    assert groupwise["grouping"] == "transfer" and groupwise["domains"] == ["prose", "code"]
    assert len(groupwise["transfer"]) == 2 and sorted(sum(groupwise["groups"], [])) == ["finetune_code", "finetune_prose"]


@pytest.mark.slow  # starting `mlflow server` is most of its ~40 s: a scale-out check, like the other servers'
def test_an_mlflow_server_on_loopback_tracks_the_runs_and_keeps_their_files(ws, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI at an `mlflow server` with its own artifact store: the runs and the
    evaluate report's files go to the server, not to the workspace."""
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        local_store = ws / ".paperdag" / "mlartifacts"  # where the SQLite default keeps run files
        local_files = set(local_store.rglob("*"))
        assert local_files  # the runs of the tests above
        assert _recomputed(_run("--from=merge")) == {"merge", "evaluate"}
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("nano")
        assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's store, not a workspace path
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert {r.data.tags["paperdag.stage"] for r in runs if "paperdag.stage" in r.data.tags} == STAGES
        assert all(r.info.status == "FINISHED" for r in runs)
        [evaluate] = [r for r in runs if r.data.tags.get("paperdag.stage") == "evaluate"]
        logged = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
        assert {"report.html", "claims.png", "metrics.json"} <= logged, logged
        assert any(p.name == "report.html" for p in (tmp_path / "server" / "artifacts").rglob("*"))  # the server's store
        assert set(local_store.rglob("*")) == local_files


def test_a_deployment_on_a_work_pool_runs_through_a_separate_worker(ws, monkeypatch, capsys):
    """`paperdag deploy` on a process work pool; a `prefect worker` in another process runs the
    flow; its MLflow run and its Prefect flow run name each other, and the results table and
    claims reach the flow run's log and a markdown artifact."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()  # the module's Prefect test server
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # a per-command server would vanish with the command
    assert main(["deploy", "nano", "--pool", "paperdag-e2e"]) == 1
    assert "needs a Prefect server that outlives this command" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", url)
    assert main(["deploy", "nano", "--pool", "paperdag-e2e", "--max-parallel", "2"]) == 0
    assert "deployment paperdag-recipe/nano-paperdag-e2e" in capsys.readouterr().out
    with get_client(sync_client=True) as client:  # each run gets its stages' limit and runner
        deployment = client.read_deployment_by_name("paperdag-recipe/nano-paperdag-e2e")
    assert (deployment.parameters["max_parallel"], deployment.parameters["runner"]) == (2, "process")
    assert main(["deploy", "nano", "--pool", "paperdag-e2e", "--name", "nightly", "--cron", "0 3 * * *"]) == 0
    with get_client(sync_client=True) as client:  # a scheduled deployment on the same pool
        [schedule] = client.read_deployment_by_name("paperdag-recipe/nightly").schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.active
    # one stage to build, so the deployment's flow starts its own worker processes (they once died
    # importing flows/inspect.py for the standard library's inspect: Prefect puts flows/ on sys.path)
    [quantize] = [p for p in (ws / "artifacts" / "quantize").iterdir()
                  if json.loads((p / "manifest.json").read_text())["stage"] == "quantize"]
    shutil.rmtree(quantize)
    flow_run = run_deployment("paperdag-recipe/nano-paperdag-e2e", timeout=0)
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "paperdag-e2e", "--run-once"],
                            env=dict(os.environ, PREFECT_API_URL=url), capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert "claims:" in worker.stdout + worker.stderr  # the run's log: results table and claims
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
        assert finished.state.is_completed(), finished.state
        [artifact] = [a for a in client.read_artifacts() if a.flow_run_id == flow_run.id]
    assert artifact.key == "paperdag-nano" and "claims:" in artifact.data and "MLflow run" in artifact.data
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("nano")
    [parent] = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`paperdag.prefect_flow_run_id` = '{flow_run.id}'"))
    assert parent.info.status == "FINISHED" and parent.data.tags["paperdag.prefect_deployment"] == "nano-paperdag-e2e"
    link = parent.data.tags["paperdag.prefect_flow_run_url"]  # and back: the flow run's page in the Prefect UI
    assert link.startswith("http") and link.endswith(f"/flow-runs/flow-run/{flow_run.id}")
    assert parent.info.run_id in artifact.data
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["paperdag.stage"] for c in children} == STAGES  # every stage recorded
    built = {c.data.tags["paperdag.stage"]: c for c in children if c.data.tags["paperdag.cache"] == "miss"}
    assert set(built) == {"quantize"} and built["quantize"].info.status == "FINISHED"
    assert (quantize / "manifest.json").exists()  # rebuilt in a worker process of the flow's own runner


@pytest.mark.slow  # ~1 min of rank start-up; the default suite launches 2 ranks in test_trainer_ranks.py
def test_a_stage_on_two_ranks_matches_its_one_rank_run_and_logs_while_it_trains(ws):
    """`resources.ranks: 2` launches the pretrain stage on torchrun from its task: a new digest
    (ranks sum gradients in another order), the one-rank loss within 1e-4 relative (the trainer
    test bounds this tightly), rank 0's log lines in the stage's MLflow run, nothing left behind."""
    one = next(o for o in _run().outcomes if o.name == "pretrain_dense")  # cache hits in file order
    [two] = _run("--set=stages.pretrain_dense.resources.ranks=2", "--only=pretrain_dense").outcomes
    assert not two.cached and two.digest != one.digest
    assert json.loads((two.path / FACTS).read_text())["ranks"] == 2
    assert two.metrics["final_loss"] == pytest.approx(one.metrics["final_loss"], rel=1e-4)
    history = mlflow_client(ws).get_metric_history(two.run_id, "train_loss")
    assert [m.step for m in history] == [4, 8, 12]
    assert not list((ws / ".paperdag" / "ranks").iterdir())
    assert not (ws / ".paperdag" / "checkpoints" / two.digest[:DIGEST_LEN]).exists()


def test_a_lora_finetune_stage_saves_a_plain_model_that_transformers_loads(ws):
    """`method: lora` on a finetune stage: peft's adapters train and are merged on save. (Last in
    the module: its artifact belongs to no recipe, which the gc test above counts.)"""
    from transformers import AutoModelForCausalLM

    [outcome] = _run("--set=stages.finetune_spdf.method=lora", "--set=stages.finetune_spdf.params.rank=4",
                     "--only=finetune_spdf").outcomes
    assert not outcome.cached
    facts = json.loads((outcome.path / FACTS).read_text())
    assert facts["method"] == "lora" and facts["lora_rank"] == 4 and facts["trainable_params"] < facts["n_params"] / 10
    model = AutoModelForCausalLM.from_pretrained(str(outcome.path))
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n in model.state_dict())


def test_a_qat_stage_saves_ternary_weights_with_their_packed_file_and_its_monitored_curves(ws):
    """`method: qat` on a finetune stage: the artifact is a plain Llama whose block weights are
    ternary, with the packed 2-bit codes beside it, measured by size; `monitor_every` records the
    held-out loss per domain while it trains. (After the gc test, as the LoRA test above.)"""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    [outcome] = _run("--set=stages.finetune_spdf.method=qat", "--set=stages.finetune_spdf.params.weight_format=ternary",
                     "--set=stages.finetune_spdf.params.monitor_every=2", "--only=finetune_spdf").outcomes
    facts = json.loads((outcome.path / FACTS).read_text())
    curve = json.loads((outcome.path / "loss_curve.json").read_text())
    assert curve["validation"] and all(points[0][0] == 0 and len(points) > 1 for points in curve["validation"].values())
    for domain, points in curve["validation"].items():
        assert facts[f"val_loss_{domain}_start"] == points[0][1] and facts[f"val_loss_{domain}_end"] == points[-1][1]
    assert facts["quantization"]["scheme"] == "qat" and facts["quantization"]["bits"] == 2
    packed = load_file(outcome.path / "quantized.safetensors")
    assert len([k for k in packed if k.endswith(".qweight")]) == facts["quantized_layers"] == 14
    assert sum(t.numel() * t.element_size() for t in packed.values()) == facts["quantization"]["packed_bytes"]
    model = AutoModelForCausalLM.from_pretrained(str(outcome.path))
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.unique().numel() <= 3, name  # {-s, 0, s}: one absmean scale per tensor


def test_a_qat_artifact_flows_into_gptq_merge_and_evaluate(ws):
    """The DAG across stages: the ternary QAT fine-tune above is GPTQ's input, one of merge's
    models, and evaluated with both; lineage runs from the score back through them."""
    qat = ["--set=stages.finetune_spdf.method=qat", "--set=stages.finetune_spdf.params.weight_format=ternary",
           "--set=stages.finetune_spdf.params.monitor_every=2"]
    summary = _run(*qat, "--set=stages.quantize.method=gptq",
                   "--set=stages.quantize.inputs={model: finetune_spdf, tokens: tokenize}",
                   "--set=stages.quantize.params={bits: 4, group_size: 32, calibration_sequences: 8}",
                   "--set=stages.merge.inputs.models=[finetune_spdf, finetune_code]",
                   "--only=finetune_spdf", "--only=quantize", "--only=merge", "--only=evaluate")
    outcomes = {o.name: o for o in summary.outcomes}
    gptq = json.loads((outcomes["quantize"].path / FACTS).read_text())
    assert gptq["method"] == "gptq" and gptq["parents"]["model"]["method"] == "qat"
    merged = json.loads((outcomes["merge"].path / FACTS).read_text())
    assert merged["merged"] == ["finetune_spdf", "finetune_code"] and not outcomes["merge"].cached
    scored = json.loads((outcomes["evaluate"].path / "metrics.json").read_text())["models"]
    assert {"finetune_spdf", "quantize", "merge"} <= set(scored), sorted(scored)


def test_lora_on_a_quantized_model_can_be_quantized_again(ws):
    """QLoRA-style: LoRA merged into an RTN model leaves the grid, so the fine-tune is not marked
    quantized and RTN may quantize it again (the quantize stage refuses a model still marked)."""
    # the recipe's distill stage becomes the second quantize stage (overrides cannot add stages)
    summary = _run("--set=stages.finetune_prose.inputs.model=quantize", "--set=stages.finetune_prose.method=lora",
                   "--set=stages.distill={kind: quantize, method: rtn, inputs: {model: finetune_prose}, "
                   "params: {bits: 4, granularity: group, group_size: 32}}",
                   "--only=quantize", "--only=finetune_prose", "--only=distill")
    outcomes = {o.name: o for o in summary.outcomes}
    finetuned = json.loads((outcomes["finetune_prose"].path / "config.json").read_text())
    assert finetuned.get("paperdag_quantization") is None
    facts = json.loads((outcomes["distill"].path / FACTS).read_text())
    assert facts["parents"]["model"]["parents"]["model"]["method"] == "rtn"


def test_an_evaluate_stage_fits_a_scaling_law_that_claims_can_name(ws):
    """`params.fits` on the evaluate stage: the law's parameters, intervals and plot land in the
    artifact and in MLflow, and a claim reads `<fit>.<param>`."""
    fit = ("[{name: toy_law, law: power, metric: ppl_all, bootstrap: 20, models: [pretrain_dense, pretrain_spdf, "
           "finetune_spdf, distill], variables: {x: {pretrain_dense: 1, pretrain_spdf: 2, finetune_spdf: 4, distill: 8}}}]")
    claim = ("[{name: toy_fit_finite, statement: the toy law's residuals are finite, kind: accounting, "
             "metric: toy_law.rmse_log, op: '>=', than: 0}]")
    [outcome] = _run(f"--set=stages.evaluate.params.fits={fit}", f"--set=claims={claim}", "--only=evaluate").outcomes
    report = json.loads((outcome.path / "metrics.json").read_text())["scaling_fits"]["toy_law"]
    assert report["law"] == "power" and set(report["params"]) == {"E", "A", "alpha"}
    assert report["n_points"] == 4 and len(report["log_residuals"]) == 4 and report["points"]["models"][0] == "pretrain_dense"
    assert (outcome.path / report["figure"]).stat().st_size > 0 and report["figure"] in (outcome.path / "report.md").read_text()
    [claim_result] = json.loads((outcome.path / "metrics.json").read_text())["claims"]
    assert claim_result["name"] == "toy_fit_finite" and claim_result["lhs"] == report["rmse_log"]


def test_a_claim_on_an_undeclared_fit_is_refused(ws):
    claim = "[{name: bad, statement: s, kind: accounting, metric: no_such_fit.alpha, op: '>', than: 0}]"
    with pytest.raises(RecipeError, match=r"claims\[bad\]: it refers to stage 'no_such_fit'"):
        _run(f"--set=claims={claim}", "--only=evaluate")


def test_a_vcycle_coalesces_trains_and_interpolates_back_through_the_dag(ws):
    """The V-cycle across stages: a vcycle_coalesce fine-tune saves the half-size model, the
    vcycle_interpolate merge brings it back to its base's shapes, and both are evaluated."""
    summary = _run("--set=stages.finetune_prose.method=vcycle_coalesce",
                   "--set=stages.merge={kind: merge, method: vcycle_interpolate, "
                   "inputs: {base: pretrain_dense, models: [finetune_prose]}, params: {alpha: 0.5}}",
                   "--set=stages.evaluate.inputs.models=[pretrain_dense, pretrain_spdf, finetune_spdf, distill, quantize, merge, "
                   "finetune_prose]",
                   "--only=finetune_prose", "--only=merge", "--only=evaluate")
    outcomes = {o.name: o for o in summary.outcomes}
    small = json.loads((outcomes["finetune_prose"].path / "config.json").read_text())
    merged = json.loads((outcomes["merge"].path / "config.json").read_text())
    base = PRESETS["nano"]  # the recipe's model, pretrain_dense's shapes
    assert (small["hidden_size"], small["num_hidden_layers"]) == (base["hidden_size"] // 2, 1)
    assert (merged["hidden_size"], merged["num_hidden_layers"]) == (base["hidden_size"], base["num_hidden_layers"])
    facts = json.loads((outcomes["finetune_prose"].path / FACTS).read_text())
    assert facts["coalesced_from"]["hidden_size"] == base["hidden_size"]
    scored = json.loads((outcomes["evaluate"].path / "metrics.json").read_text())["models"]
    assert {"finetune_prose", "merge"} <= set(scored) and all(math.isfinite(scored[m]["ppl_all"]) for m in scored)


def test_an_evaluate_stage_scores_the_checkpoints_a_training_stage_kept(ws):
    """The Fine Line's checkpoint sweep: `keep_checkpoints` on a training stage keeps its weights at
    those fractions inside its artifact; `checkpoints: true` on the evaluate stage scores each as
    `<stage>_at<percent>` and plots every capability along training."""
    import torch

    from components.model.presets import load_model
    from components.train.trainer import load_weights

    summary = _run("--set=stages.finetune_spdf.params.keep_checkpoints=[0.0, 0.5]",
                   "--set=stages.evaluate.params.checkpoints=true")
    outcomes = {o.name: o for o in summary.outcomes}
    finetune, evaluate = outcomes["finetune_spdf"], outcomes["evaluate"]
    facts = json.loads((finetune.path / FACTS).read_text())
    assert [(k["step"], k["fraction"]) for k in facts["kept_checkpoints"]] == [(0, 0.0), (2, 0.5)]
    # step 0 is the fine-tune's input model, weight for weight
    start = load_model(finetune.path)
    load_weights(start, finetune.path / facts["kept_checkpoints"][0]["path"] / "model.safetensors")
    parent = load_model(outcomes["pretrain_spdf"].path)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), parent.state_dict().values()))
    models = json.loads((evaluate.path / "metrics.json").read_text())["models"]
    for label, fraction in (("finetune_spdf_at0", 0.0), ("finetune_spdf_at50", 0.5)):
        assert models[label]["checkpoint_of"] == "finetune_spdf" and models[label]["checkpoint_fraction"] == fraction
        assert math.isfinite(models[label]["ppl_all"])
    assert models["finetune_spdf_at0"]["ppl_all"] != models["finetune_spdf"]["ppl_all"]
    assert (evaluate.path / "checkpoint_sweep.png").stat().st_size > 0
    assert "checkpoint_sweep.png" in (evaluate.path / "report.md").read_text()
