"""A changed input reruns exactly what depends on it: data files and project code alike."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from flows.cli import main
from tests.helpers import REPO, make_workspace

DATA_RECIPE = """\
name: data_edit
paper: {title: "fault case: an edited data file", url: "https://example.org"}
reproduces: "nothing; a corpus from a local jsonl file and its tokens"
model: nano
precision: fp32
data:
  sources:
    - {type: jsonl, path: data/docs.jsonl}
    - {type: arithmetic, n_docs: 60, max_digits: 2}
  noise: {boilerplate: 0, gibberish: 0, exact_duplicate: 0, near_duplicate: 0, spam: 0}
stages:
  corpus: {kind: corpus, method: standard_corpus}
  tokenize: {kind: tokenize, method: byte_bpe, inputs: {docs: corpus}, params: {vocab_size: 300, seq_len: 16}}
"""


def write_docs(path, n):
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"document number {i} says {' '.join(['word'] * (i % 7 + 3))}",
                                        "domain": "prose"}) + "\n" for i in range(n)))


def run_stage(ws, name, capsys):
    capsys.readouterr()
    assert main(["--workspace", str(ws), "stage", "data_edit", name, "--no-progress", "--no-track"]) == 0
    return capsys.readouterr().out


@pytest.mark.fault("recovers")
def test_an_edited_data_file_rebuilds_its_corpus_and_what_follows(tmp_path, capsys, monkeypatch):
    """400 -> 100 documents used to report cache hits and keep the 400-row corpus."""
    ws = make_workspace(tmp_path / "ws", {})
    (ws / "params" / "data_edit.yaml").write_text(DATA_RECIPE)
    monkeypatch.chdir(ws)  # relative data paths are relative to where paperdag runs
    write_docs(ws / "data" / "docs.jsonl", 400)
    assert "done" in run_stage(ws, "corpus", capsys) and "done" in run_stage(ws, "tokenize", capsys)
    assert "cached" in run_stage(ws, "corpus", capsys) and "cached" in run_stage(ws, "tokenize", capsys)
    write_docs(ws / "data" / "docs.jsonl", 100)
    assert "done" in run_stage(ws, "corpus", capsys) and "done" in run_stage(ws, "tokenize", capsys)
    corpora = [json.loads(p.read_text())["facts"]["rows"] for p in ws.glob("artifacts/corpus/*/manifest.json")]
    assert sorted(corpora) == [160, 460]  # the old corpus stays cached under its own digest; 100 + 60 is new
    assert len(list(ws.glob("artifacts/tokenize/*"))) == 2
    # the same bytes written again (a new mtime and inode) are the same input: a hit
    (ws / "data" / "docs.jsonl").write_bytes((ws / "data" / "docs.jsonl").read_bytes())
    assert "cached" in run_stage(ws, "corpus", capsys)


@pytest.mark.fault("recovers")
def test_dvc_lists_the_data_file_as_a_dependency(tmp_path, monkeypatch):
    """dvc.yaml listed only the recipe and code, so `dvc repro` never saw an edited data file."""
    import yaml

    from flows.dvc_sync import render_dvc_yaml

    ws = make_workspace(tmp_path / "ws", {})
    (ws / "params" / "data_edit.yaml").write_text(DATA_RECIPE)
    monkeypatch.chdir(ws)
    write_docs(ws / "data" / "docs.jsonl", 50)
    corpus = yaml.safe_load(render_dvc_yaml(ws))["stages"]["data_edit-corpus"]
    assert "data/docs.jsonl" in corpus["deps"]
    assert not any(dep.startswith("/") for dep in corpus["deps"])  # the Python installation's files stay out


DIGESTS = """
import json, sys
from pathlib import Path
from flows.recipe import load_plan
_, plan = load_plan(Path("tests/recipes/nano.yaml"))
print(json.dumps({s.name: s.digest for s in plan.stages.values()}))
"""


def digests(project):
    out = subprocess.run([sys.executable, "-c", DIGESTS], cwd=project, capture_output=True, text=True,
                         env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin", "HOME": str(project),
                              "PAPERDAG_CACHE_DIR": str(project / ".cache")}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.fault("recovers")
def test_editing_a_tasks_helper_reruns_exactly_the_stages_that_import_it(tmp_path):
    """An edit of tasks/model_io.py used to change no digest, and evaluate served stale numbers."""
    project = tmp_path / "project"
    for part in ("flows", "tasks", "components"):
        shutil.copytree(REPO / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "tests" / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "recipes" / "nano.yaml", project / "tests" / "recipes")
    before = digests(project)

    with open(project / "tasks" / "train.py", "a") as f:
        f.write("\n# an edit to the training task\n")
    after_train = digests(project)
    trained = {"pretrain_dense", "pretrain_spdf", "finetune_spdf", "finetune_prose", "finetune_code", "distill"}
    downstream = {"quantize", "merge", "evaluate"}
    assert {s for s in before if before[s] != after_train[s]} == trained | downstream

    with open(project / "tasks" / "model_io.py", "a") as f:
        f.write("\n# an edit to a helper most stages import\n")
    after_helper = digests(project)
    assert {s for s in before if after_train[s] == after_helper[s]} == {"corpus"}  # the one stage not importing it

    with open(project / "components" / "merge" / "task_arithmetic.py", "a") as f:
        f.write("\n# an edit to one method\n")
    after_method = digests(project)
    assert {s for s in before if after_helper[s] != after_method[s]} == {"merge", "evaluate"}
