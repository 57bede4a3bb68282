"""Per-model evaluations: scored once per (model bytes, test data, evaluator params, code)."""
from __future__ import annotations

import json

import pytest

from components.eval.standard import StandardEvaluation
from components.eval.sweep_plot import SweepPlot
from tasks.artifacts import ArtifactCorruptError, ArtifactStore
from tasks.eval_cache import EVAL_KIND, cached_evaluation


def _artifact(store: ArtifactStore, kind: str, digest: str, content: str):
    with store.writer(kind, digest, {"kind": kind, "stage": f"{kind}_stage", "recipe": "r"}, replace=True) as tmp:
        (tmp / "model.safetensors").write_text(content)
    return store.get(kind, digest)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts", tmp_path / ".paperdag")


def _scorer(calls: list):
    def score(work_dir):
        calls.append(work_dir)
        work_dir.mkdir(parents=True)
        (work_dir / "task.yaml").write_text("task: t\n")
        return {"ppl_all": 40.0 + len(calls)}
    return score


def test_a_model_is_scored_once_and_its_files_come_back_each_time(store, tmp_path):
    model = _artifact(store, "quantize", "a" * 64, "weights")
    tokens = _artifact(store, "tokenize", "b" * 64, "blocks")
    evaluator, calls = StandardEvaluation(StandardEvaluation.Params()), []
    first, reused = cached_evaluation(store, evaluator, model, tokens, tmp_path / "one" / "quantize", _scorer(calls))
    assert (first, reused) == ({"ppl_all": 41.0}, False)
    again, reused = cached_evaluation(store, evaluator, model, tokens, tmp_path / "two" / "quantize", _scorer(calls))
    assert (again, reused) == ({"ppl_all": 41.0}, True) and len(calls) == 1
    assert (tmp_path / "two" / "quantize" / "task.yaml").read_text() == "task: t\n"
    [entry] = list((store.root / EVAL_KIND).iterdir())
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["inputs"] == {"model": "a" * 64, "tokens": "b" * 64} and manifest["model_stage"] == "quantize_stage"

    # a report-only param (the sweep plot) does not re-score; a scoring param does
    plotted = StandardEvaluation(StandardEvaluation.Params(plot=SweepPlot(metric="ppl_all", x={"a": 1, "b": 2})))
    assert cached_evaluation(store, plotted, model, tokens, tmp_path / "3", _scorer(calls))[1] is True
    capped = StandardEvaluation(StandardEvaluation.Params(max_blocks_per_domain=4))
    assert cached_evaluation(store, capped, model, tokens, tmp_path / "4", _scorer(calls))[1] is False
    # so does other test data, and other bytes under the same model digest (a forced rerun)
    other_tokens = _artifact(store, "tokenize", "c" * 64, "other blocks")
    assert cached_evaluation(store, evaluator, model, other_tokens, tmp_path / "5", _scorer(calls))[1] is False
    rebuilt = _artifact(store, "quantize", "a" * 64, "different weights")
    assert cached_evaluation(store, evaluator, rebuilt, tokens, tmp_path / "6", _scorer(calls))[1] is False
    assert len(calls) == 4


def test_a_failed_scoring_leaves_no_entry_and_a_corrupt_one_is_named(store, tmp_path):
    model = _artifact(store, "quantize", "a" * 64, "weights")
    tokens = _artifact(store, "tokenize", "b" * 64, "blocks")
    evaluator = StandardEvaluation(StandardEvaluation.Params())

    def broken(work_dir):
        raise RuntimeError("NaN logits")

    with pytest.raises(RuntimeError, match="NaN logits"):
        cached_evaluation(store, evaluator, model, tokens, tmp_path / "out", broken)
    assert not (store.root / EVAL_KIND).exists() or not any((store.root / EVAL_KIND).iterdir())
    cached_evaluation(store, evaluator, model, tokens, tmp_path / "out", _scorer([]))
    [entry] = list((store.root / EVAL_KIND).iterdir())
    (entry / "scores.json").write_text('{"ppl_all": 1.0}')  # same size, other content
    with pytest.raises(ArtifactCorruptError, match="scores.json is corrupt"):
        cached_evaluation(store, evaluator, model, tokens, tmp_path / "out", _scorer([]))
