"""The compiled-plan cache: a hit is the plan the compiler makes, without importing torch, and
every input a plan depends on invalidates it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.errors import RecipeError
from flows.plan_cache import code_fingerprint, compiled_plan
from flows.recipe import load_plan
from tests.helpers import NANO_RECIPE, REPO

RECIPE = """\
name: tiny
include: [base.yaml]
model: nano
data:
  sources: [{type: jsonl, path: docs.jsonl, domain: prose}]
stages:
  corpus: {kind: corpus, method: standard_corpus}
  tokenize: {kind: tokenize, method: byte_bpe, inputs: {docs: corpus}, params: {vocab_size: 300, seq_len: 16}}
  pretrain: {kind: pretrain, method: dense, inputs: {tokens: tokenize}, params: {steps: 4, batch_size: 2}}
"""
BASE = "paper: {{title: A paper, url: https://example.org}}\nreproduces: a claim\nseed: {seed}\n"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A recipe that includes a file and reads a local data file (relative to the cwd)."""
    monkeypatch.setenv("PAPERDAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "tiny.yaml").write_text(RECIPE)
    (tmp_path / "params" / "base.yaml").write_text(BASE.format(seed=0))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    return tmp_path


def entries(project: Path) -> list[Path]:
    return sorted((project / "cache" / "plans").glob("*.json"))


def digests(plan) -> dict[str, str]:
    return {name: s.digest for name, s in plan.stages.items()}


def test_a_hit_is_the_plan_the_compiler_makes(project):
    recipe = project / "params" / "tiny.yaml"
    compiled, listing = compiled_plan(recipe)
    assert len(entries(project)) == 1
    cached, cached_listing = compiled_plan(recipe)
    assert len(entries(project)) == 1  # a hit writes nothing
    assert cached == compiled == load_plan(recipe)[1]  # every field, paths included
    assert cached_listing == listing and listing["stages"] == ["corpus", "tokenize", "pretrain"]


def test_every_input_of_the_plan_invalidates_it(project):
    recipe = project / "params" / "tiny.yaml"
    before = digests(compiled_plan(recipe)[0])

    def changed_stages() -> set[str]:
        now = compiled_plan(recipe)[0]
        assert digests(now) == digests(load_plan(recipe)[1])  # the cache never disagrees with the compiler
        return {name for name, d in digests(now).items() if before.get(name) != d}

    (project / "docs.jsonl").write_text(json.dumps({"text": "another document"}) + "\n")  # a data file
    assert changed_stages() == {"corpus", "tokenize", "pretrain"}
    before = digests(compiled_plan(recipe)[0])
    (project / "params" / "base.yaml").write_text(BASE.format(seed=1))
    assert changed_stages() == {"corpus", "tokenize", "pretrain"}  # an included file (the seed reaches all)
    before = digests(compiled_plan(recipe)[0])
    recipe.write_text(RECIPE.replace("steps: 4", "steps: 5"))  # the recipe itself
    assert changed_stages() == {"pretrain"}
    overridden = compiled_plan(recipe, ["stages.pretrain.params.steps=6"])[0]  # --set
    assert overridden.stages["pretrain"].params["steps"] == 6
    assert compiled_plan(recipe)[0].stages["pretrain"].params["steps"] == 5


def test_a_directory_that_appears_invalidates_a_plan_that_probed_for_it(project):
    """``model: someorg/ckpt`` is a hub name until a local directory of that name exists; then the
    stage reads (and hashes) the directory. The cached plan noted its absence."""
    recipe = project / "params" / "tiny.yaml"
    recipe.write_text(RECIPE + "  pretrain_from: {kind: pretrain, method: dense, model: someorg/ckpt, "
                               "inputs: {tokens: tokenize}, params: {steps: 4, batch_size: 2}}\n")
    hub = compiled_plan(recipe)[0].stages["pretrain_from"]
    assert hub.input_files == {}
    (project / "someorg" / "ckpt").mkdir(parents=True)
    (project / "someorg" / "ckpt" / "config.json").write_text("{}")
    local = compiled_plan(recipe)[0].stages["pretrain_from"]
    assert local.input_files == {"model": [Path("someorg/ckpt")]}
    assert local.digest != hub.digest and local.digest == load_plan(recipe)[1].stages["pretrain_from"].digest


def test_a_recipe_that_does_not_compile_is_never_cached(project):
    recipe = project / "params" / "tiny.yaml"
    recipe.write_text(RECIPE.replace("method: dense", "method: no_such_method"))
    with pytest.raises(RecipeError) as cached_error:
        compiled_plan(recipe)
    with pytest.raises(RecipeError) as compiled_error:
        load_plan(recipe)
    assert str(cached_error.value) == str(compiled_error.value)
    assert "no_such_method" in str(cached_error.value)
    assert entries(project) == []


def test_code_fingerprint_covers_every_source_file(tmp_path):
    for package in ("flows", "components", "tasks"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    base = code_fingerprint(tmp_path)
    assert base == code_fingerprint(REPO)
    registry = tmp_path / "components" / "quant" / "registry.py"
    registry.write_text(registry.read_text() + "\n# an edit\n")
    assert code_fingerprint(tmp_path) != base
    registry.write_text(registry.read_text().removesuffix("\n# an edit\n"))
    assert code_fingerprint(tmp_path) == base
    (tmp_path / "tasks" / "new_module.py").write_text("X = 1\n")
    assert code_fingerprint(tmp_path) != base


def test_a_corrupt_or_foreign_entry_is_compiled_again(project):
    recipe = project / "params" / "tiny.yaml"
    good = compiled_plan(recipe)[0]
    [entry] = entries(project)
    valid = json.loads(entry.read_text())
    broken_stage = {**valid, "plan": {**valid["plan"], "stages": [{**valid["plan"]["stages"][0], "extra": 1}]}}
    for garbage in ("{not json", json.dumps({"format": 0}), json.dumps({"format": 1, "plan": {}}), "[]",
                    json.dumps(broken_stage), json.dumps({**valid, "listing": None})):
        entry.write_text(garbage)
        assert compiled_plan(recipe)[0] == good
        assert json.loads(entry.read_text())["format"] == 1  # rewritten


def test_an_unwritable_cache_only_loses_the_speed_up(project, monkeypatch):
    (project / "not_a_directory").write_text("")  # mkdir under a file fails, even for root
    monkeypatch.setenv("PAPERDAG_CACHE_DIR", str(project / "not_a_directory" / "cache"))
    recipe = project / "params" / "tiny.yaml"
    assert compiled_plan(recipe)[0] == load_plan(recipe)[1]
    assert compiled_plan(recipe)[0] == load_plan(recipe)[1]


def test_inspecting_again_answers_without_torch(tmp_path):
    """The second validate/status/list of an unchanged recipe reads the cache: no torch, same output."""
    ws = tmp_path / "ws"
    (ws / "params").mkdir(parents=True)
    shutil.copy(NANO_RECIPE, ws / "params" / "nano.yaml")
    code = ("import sys; from flows.cli import main; main(['--workspace', sys.argv[1], *sys.argv[2:]]); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'prefect', 'transformers') if m in sys.modules))")
    env = {"PAPERDAG_CACHE_DIR": str(tmp_path / "cache")}
    for command in (["validate", "nano"], ["status", "nano", "--json"], ["list"]):
        runs = [subprocess.run([sys.executable, "-c", code, str(ws), *command], capture_output=True, text=True,
                               cwd=REPO, env={**_env(), **env}) for _ in range(2)]
        first, second = (r.stdout.strip().splitlines() for r in runs)
        assert runs[0].returncode == runs[1].returncode == 0, runs[0].stderr + runs[1].stderr
        assert second[-1] == "[]", (command, second[-1])
        assert first[:-1] == second[:-1]  # what the command printed, the module list aside


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
