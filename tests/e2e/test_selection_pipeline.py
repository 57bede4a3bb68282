"""The data-selection DAG end to end (tests/recipes/select_nano.yaml) and its bad-input paths.

Each bad input must give a clear error naming the problem, a non-zero exit, no artifact of the
failing stage, and no MLflow run left RUNNING.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import EXIT_FAILED, EXIT_USAGE, main
from tasks.fingerprint import sha256_file
from tests.helpers import REPO, make_workspace, mlflow_client

pytestmark = pytest.mark.e2e
RECIPE = REPO / "tests" / "recipes" / "select_nano.yaml"


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> Path:
    """The whole recipe, run once: the happy path that the bad-input tests then break."""
    root = make_workspace(tmp_path_factory.mktemp("select") / "ws", {"select_nano": RECIPE})
    assert main(["--workspace", str(root), "run", "select_nano", "--no-progress"]) == 0
    return root


def _stage(ws: Path, *args) -> int:
    return main(["--workspace", str(ws), "stage", "select_nano", *args, "--no-progress"])


def _metrics(ws: Path, kind: str, stage: str) -> dict:
    for path in (ws / "artifacts" / kind).iterdir():
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest["stage"] == stage:
            return json.loads((path / "stage_metrics.json").read_text())
    raise AssertionError(f"no {kind} artifact of stage {stage}")


def _assert_failed_cleanly(ws: Path, kind: str, stage: str, before: set[str]) -> None:
    after = {p.name for p in (ws / "artifacts" / kind).iterdir()}
    assert after == before, f"stage {stage} left {sorted(after - before)} behind"
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("select_nano")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    failed = [r for r in runs if r.data.tags.get("paperdag.stage") == stage and r.info.status == "FAILED"]
    assert failed, f"no FAILED MLflow run for stage {stage}"
    assert all(r.info.status != "RUNNING" for r in runs)


def _existing(ws: Path, kind: str) -> set[str]:
    return {p.name for p in (ws / "artifacts" / kind).iterdir()}


def test_budget_is_met_in_tokens_of_the_shared_tokenizer(selected):
    m = _metrics(selected, "select", "select_random")
    assert m["selected_tokens"] >= 8000 and m["selected_tokens"] < 8000 + 3000  # overshoot < one document
    assert m["pool_tokens"] > m["selected_tokens"]
    vocab = {json.loads((p / "manifest.json").read_text())["stage"]: (p / "tokenizer" / "tokenizer.json").read_bytes()
             for p in (selected / "artifacts" / "tokenize").iterdir()}
    assert vocab["tokenize_random"] == vocab["tokenize_pool"] == vocab["tokenize_dsir"]  # losses compare
    assert vocab["tokenize_other"] != vocab["tokenize_pool"]


def test_budget_larger_than_the_pool(selected, capsys):
    before = _existing(selected, "select")
    rc = _stage(selected, "select_random", "--set", "stages.select_random.params.budget_tokens=1000000000")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "budget_tokens=1000000000 is larger than the pool" in err
    _assert_failed_cleanly(selected, "select", "select_random", before)


def test_token_budget_without_a_tokenizer_input(selected, capsys):
    # caught when the recipe is compiled, before any stage runs
    before = _existing(selected, "select")
    rc = _stage(selected, "select_random", "--set", "stages.select_random.inputs={docs: corpus}")
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "stages.select_random.inputs: budget_tokens needs a `tokenizer` input" in err
    assert _existing(selected, "select") == before


def test_a_model_scorer_without_a_tokenizer_input(selected, capsys):
    # no budget here: the model scorer itself needs the tokenizer; refused at compile time too
    before = _existing(selected, "select")
    rc = _stage(selected, "select_ppl",
                "--set", "stages.select_ppl.inputs={docs: corpus, reference: [pretrain_reference]}",
                "--set", "stages.select_ppl.params={keep_fraction: 0.5}")
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "stages.select_ppl.inputs: method perplexity_filter needs a `tokenizer` input" in err
    assert _existing(selected, "select") == before


def test_nothing_left_after_selection(selected, capsys):
    before = _existing(selected, "select")
    rc = _stage(selected, "select_random", "--set", "stages.select_random.method=heuristic_filter",  # no document
                "--set", "stages.select_random.params={defaults: {min_words: 1000000000}, domain_overrides: {}}")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "no training documents left after selection (0 of" in err and "loosen stages.select_random.params" in err
    _assert_failed_cleanly(selected, "select", "select_random", before)


def test_documents_failing_the_schema(selected, capsys):
    [corpus_dir] = (selected / "artifacts" / "corpus").iterdir()
    shard = next((corpus_dir / "docs").glob("part-*.parquet"))
    original = shard.read_bytes()
    frame = pd.read_parquet(shard)
    frame.loc[frame.index[:3], "split"] = "holdout"  # not a split the schema knows
    frame.to_parquet(shard, index=False)
    # re-record the shard in the manifest: the artifact is then intact as files (an edited file is
    # caught as corrupt before any schema check) and only its rows are wrong, as rows from an
    # older writer or an imported dataset would be
    manifest_path = corpus_dir / "manifest.json"
    original_manifest = manifest_path.read_text()
    manifest = json.loads(original_manifest)
    manifest["files"][str(shard.relative_to(corpus_dir))] = {"bytes": shard.stat().st_size,
                                                             "sha256": sha256_file(shard)}
    manifest_path.write_text(json.dumps(manifest))
    before = _existing(selected, "select")
    try:
        rc = _stage(selected, "select_random", "--set", "stages.select_random.params.seed=7")
        assert rc == EXIT_FAILED
        err = capsys.readouterr().err
        assert shard.name in err and "'split'" in err and "holdout" in err
        _assert_failed_cleanly(selected, "select", "select_random", before)
    finally:
        shard.write_bytes(original)
        manifest_path.write_text(original_manifest)


def test_dsir_claim_reads_the_select_stage_metrics(selected):
    m = _metrics(selected, "select", "select_dsir")
    assert m["selected_share_code"] > 2 * m["pool_share_code"]
    report = json.loads(next((selected / "artifacts" / "evaluate").glob("*/metrics.json")).read_text())
    [claim] = report["claims"]
    assert claim["name"] == "dsir_target_share" and claim["control"]["replace"] == {"select_dsir": "select_random"}
    # the control is the same comparison on the random selection's logged shares
    r = _metrics(selected, "select", "select_random")
    assert claim["control"]["slack"] == pytest.approx(r["selected_share_code"] - 2 * r["pool_share_code"])
    assert claim["slack"] == pytest.approx(m["selected_share_code"] - 2 * m["pool_share_code"])


def test_perplexity_filter_ran_on_the_shared_tokenizer(selected):
    m = _metrics(selected, "select", "select_ppl")
    assert m["selected_tokens"] >= 8000 and m["score_median_kept"] > m["score_median_pool"]


def test_empty_target_set(selected, capsys):
    before = _existing(selected, "select")
    rc = _stage(selected, "select_dsir", "--set", "stages.select_dsir.params.target_domain=klingon")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "the target set is empty" in err and "'klingon'" in err and "arithmetic, code, prose" in err
    _assert_failed_cleanly(selected, "select", "select_dsir", before)


def test_reference_model_with_another_tokenizer(selected, capsys):
    before = _existing(selected, "select")
    rc = _stage(selected, "select_ppl", "--set", "stages.select_ppl.inputs.reference=[pretrain_other]")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "reference pretrain_other" in err and "600" in err and "512" in err
    _assert_failed_cleanly(selected, "select", "select_ppl", before)


def test_quality_review_writes_a_queue_and_reads_the_persons_labels_back(selected, monkeypatch, capsys):
    """1.5-Pints' loop: classify, queue the borderline documents, a person labels them, and saving
    the labels reruns exactly the reviewing stage with them (the file is an input of its digest)."""
    from benchmarks.simulate_review import simulate_review
    from flows.recipe import load_plan

    monkeypatch.chdir(selected)  # the labels path is relative, like any data path
    (selected / "params" / "review.yaml").write_text(
        "include: [select_nano.yaml]\nname: review\nstages:\n"
        "  select_quality: {kind: select, method: quality_review, inputs: {docs: corpus, tokenizer: tokenize_pool},"
        " params: {target_domain: prose, budget_tokens: 8000, review_size: 20, review_labels: reviews/q.jsonl}}\n")
    run = lambda: main(["--workspace", str(selected), "stage", "review", "select_quality", "--no-progress"])  # noqa: E731
    assert run() == 0
    first = load_plan(selected / "params" / "review.yaml")[1].stages["select_quality"].digest
    m = _metrics(selected, "select", "select_quality")
    assert m["review_labels_used"] == 0 and m["review_queue_docs"] == 20
    [art] = [p for p in (selected / "artifacts" / "select").iterdir()
             if json.loads((p / "manifest.json").read_text())["stage"] == "select_quality"]
    queue = [json.loads(line) for line in (art / "review_queue.jsonl").read_text().splitlines()]
    assert len(queue) == 20 and sum(q["kept"] for q in queue) == 10 and all(q["label"] is None for q in queue)
    assert [q["score"] for q in queue] == sorted((q["score"] for q in queue), reverse=True)
    corpus = next(p for p in (selected / "artifacts" / "corpus").iterdir())
    counts = simulate_review(art / "review_queue.jsonl", corpus, selected / "reviews" / "q.jsonl")
    assert counts["keep"] + counts["drop"] == 20
    second = load_plan(selected / "params" / "review.yaml")[1].stages["select_quality"].digest
    assert second != first  # the saved labels are an input: the stage reruns with them
    assert run() == 0
    reviewed = max((p for p in (selected / "artifacts" / "select").iterdir()
                    if json.loads((p / "manifest.json").read_text())["stage"] == "select_quality"),
                   key=lambda p: p.stat().st_mtime)
    facts = json.loads((reviewed / "stage_metrics.json").read_text())
    assert facts["review_labels_used"] == 20 and facts["review_labels_keep"] == counts["keep"]
    requeued = {json.loads(line)["id"] for line in (reviewed / "review_queue.jsonl").read_text().splitlines()}
    assert not requeued & {q["id"] for q in queue}  # reviewed documents are not asked again
    (selected / "reviews" / "q.jsonl").write_text('{"id": "x", "text": "t", "label": "maybe"}\n')
    capsys.readouterr()
    assert run() == EXIT_FAILED
    assert "q.jsonl:1: label must be 'keep', 'drop' or empty, got 'maybe'" in capsys.readouterr().err
