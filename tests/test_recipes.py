"""Every shipped recipe validates; every kind of bad recipe is a clear error with exit code 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import EXIT_USAGE, main
from flows.recipe import RecipeError, load_plan, load_recipe
from tests.helpers import NANO_RECIPE, REPO

SHIPPED = sorted((REPO / "params").glob("*.yaml")) + [NANO_RECIPE]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_compiles(path):
    recipe, plan = load_plan(path)
    assert plan.stages and len({s.digest for s in plan.stages.values()}) == len(plan.stages)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path} must start with a comment header naming the paper"
    assert "paperdag run" in path.read_text(), f"{path} header must give the command"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _nano_with(tmp_path, old: str, new: str) -> Path:
    text = NANO_RECIPE.read_text()
    assert old in text
    return _write(tmp_path, text.replace(old, new, 1))


def test_malformed_yaml_names_file(tmp_path):
    p = _write(tmp_path, "name: x\nstages: {a: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: malformed YAML"):
        load_recipe(p)


def test_unknown_top_level_key_lists_known_keys(tmp_path):
    p = _nano_with(tmp_path, "seed: 0", "seed: 0\nsede: 1")
    with pytest.raises(RecipeError, match=r"unknown top-level key\(s\) \['sede'\]; known keys: name, paper"):
        load_recipe(p)


def test_unknown_param_key_names_stage_and_method(tmp_path):
    p = _nano_with(tmp_path, "params: {bits: 4,", "params: {bitz: 4, bits: 4,")
    with pytest.raises(RecipeError, match=r"stages\.quantize\.params\.bitz: unknown key \(method rtn\)"):
        load_recipe(p)


def test_wrong_type_names_field(tmp_path):
    p = _nano_with(tmp_path, "params: {bits: 4,", "params: {bits: four,")
    with pytest.raises(RecipeError, match=r"stages\.quantize\.params\.bits: .*'four'"):
        load_recipe(p)


def test_unknown_method_lists_registered(tmp_path):
    p = _nano_with(tmp_path, "method: rtn", "method: gptqq")
    with pytest.raises(RecipeError, match=r"stages\.quantize\.method: unknown quantize method 'gptqq'; registered quantize methods: adaquant, .*gptq, .*rtn"):
        load_recipe(p)


def test_import_path_is_not_a_method(tmp_path):
    p = _nano_with(tmp_path, "method: rtn", "method: os.system")
    with pytest.raises(RecipeError, match="unknown quantize method 'os.system'"):
        load_recipe(p)


def test_input_naming_missing_stage(tmp_path):
    p = _nano_with(tmp_path, "inputs: {model: pretrain_dense}", "inputs: {model: pretrain_dance}")
    with pytest.raises(RecipeError, match=r"inputs\.model: names stage 'pretrain_dance', which does not exist"):
        load_recipe(p)


def test_cycle_is_reported_with_its_path(tmp_path):
    p = _write(tmp_path, """
name: cyc
paper: {title: t, url: u}
reproduces: r
stages:
  a: {kind: select, method: minhash_dedup, inputs: {docs: b}}
  b: {kind: select, method: minhash_dedup, inputs: {docs: a}}
""")
    with pytest.raises(RecipeError, match=r"cycle: a -> b -> a"):
        load_recipe(p)


def test_wrong_input_kind(tmp_path):
    p = _nano_with(tmp_path, "inputs: {model: pretrain_dense}", "inputs: {model: tokenize}")
    with pytest.raises(RecipeError, match=r"stage 'tokenize' is a tokenize stage; model accepts pretrain"):
        load_recipe(p)


def test_claim_on_a_stage_no_evaluate_stage_sees(tmp_path):
    p = _nano_with(tmp_path, "metric: quantize.size_bytes", "metric: nope.size_bytes")
    with pytest.raises(RecipeError, match=r"refers to stage 'nope', which is neither evaluated nor upstream"):
        load_recipe(p)


def test_claim_on_an_upstream_stage_metric_is_allowed(tmp_path):
    # e.g. a selection's target share: the evaluate stage reads upstream stages' logged metrics
    p = _nano_with(tmp_path, "metric: quantize.size_bytes", "metric: filter.train_docs_kept")
    assert load_recipe(p).claims


def test_overrides_are_strict(tmp_path):
    _, plan = load_plan(NANO_RECIPE, ["stages.quantize.params.bits=8"])
    assert plan.stages["quantize"].params["bits"] == 8
    with pytest.raises(RecipeError, match=r"stages\.quantize\.params\.bitz: unknown key"):
        load_plan(NANO_RECIPE, ["stages.quantize.params.bitz=8"])
    with pytest.raises(RecipeError, match=r"unknown key 'stages\.quantise'"):
        load_plan(NANO_RECIPE, ["stages.quantise.params.bits=8"])
    with pytest.raises(RecipeError, match=r"stages\.quantize\.params\.bits: .*'eight'"):
        load_plan(NANO_RECIPE, ["stages.quantize.params.bits=eight"])
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        load_plan(NANO_RECIPE, ["stages.quantize.params.bits"])


def test_param_change_changes_exactly_downstream_digests():
    _, a = load_plan(NANO_RECIPE)
    _, b = load_plan(NANO_RECIPE, ["stages.quantize.params.bits=8"])
    changed = {n for n in a.stages if a.stages[n].digest != b.stages[n].digest}
    assert changed == {"quantize", "evaluate"}


def test_cli_validate_and_errors_exit_codes(tmp_path, capsys):
    assert main(["validate", str(NANO_RECIPE)]) == 0
    assert "valid (" in capsys.readouterr().out
    bad = _nano_with(tmp_path, "method: rtn", "method: nope")
    assert main(["validate", str(bad)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error:" in err and "unknown quantize method 'nope'" in err and "Traceback" not in err
    assert main(["run", str(NANO_RECIPE), "--only", "nonexistent"]) == EXIT_USAGE
    assert "has no stage 'nonexistent'" in capsys.readouterr().err


def test_cli_list_shows_paper_stages_and_claims(capsys):
    assert main(["--workspace", str(REPO), "list"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "claim:" in out and "corpus -> filter" in out


def test_committed_dvc_yaml_is_current():
    from flows.dvc_sync import render_dvc_yaml

    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(REPO), "run `paperdag dvc-sync` and commit dvc.yaml"


def test_method_needing_a_teacher_without_one(tmp_path):
    p = _nano_with(tmp_path, "inputs: {tokens: tokenize, teacher: pretrain_dense}", "inputs: {tokens: tokenize}")
    with pytest.raises(RecipeError, match=r"stages\.distill\.inputs: method logit_kd distills from a teacher"):
        load_recipe(p)


SELECT_NANO = Path(__file__).parent / "recipes" / "select_nano.yaml"


@pytest.mark.parametrize("stage, override, message", [
    ("select_dsir", "params={budget_tokens: 8000}", r"selects toward a target set; set target_domain"),
    ("select_random", "params={budget_tokens: 8000, target_domain: prose}", r"does not use a target set"),
    ("select_ppl", "inputs={docs: corpus, tokenizer: tokenize_pool}", r"needs at least 1 `reference` model"),
    ("select_random", "inputs={docs: corpus}", r"budget_tokens needs a `tokenizer` input"),
])
def test_selector_inputs_are_checked_before_anything_runs(stage, override, message):
    with pytest.raises(RecipeError, match=rf"stages\.{stage}.*{message}"):
        load_recipe(SELECT_NANO, [f"stages.{stage}.{override}"])


def test_recipe_level_execution_choices_reach_every_training_stage():
    _, plan = load_plan(NANO_RECIPE, ["torch_compile=off", "attention=sdpa"])
    trained = [s for s in plan.stages.values() if "torch_compile" in s.params]
    assert trained and all(s.params["torch_compile"] is False and s.params["attention"] == "sdpa" for s in trained)
    assert all("torch_compile" not in s.params for s in plan.stages.values() if s.kind == "quantize")
    _, default = load_plan(NANO_RECIPE)
    assert all(default.stages[s.name].params["torch_compile"] == "auto" for s in trained)
    with pytest.raises(RecipeError, match="attention"):
        load_plan(NANO_RECIPE, ["attention=flash"])
