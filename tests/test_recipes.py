"""Every shipped recipe validates; every kind of bad recipe is a clear error with exit code 2."""
from __future__ import annotations

import re
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
    with pytest.raises(RecipeError, match=r"stage 'tokenize' is a tokenize stage; model accepts model, pretrain"):
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


def test_only_on_an_unbuilt_upstream_is_refused_before_anything_starts(workspace, capsys):
    import time

    start = time.perf_counter()
    assert main(["run", "nano", "--only", "quantize", "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "stage quantize reads pretrain_dense, which is not built" in err and "--only pretrain_dense" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert time.perf_counter() - start < 20  # no Prefect server, no MLflow run
    assert not (workspace / "mlflow.db").exists() and not list((workspace / "artifacts").glob("*/*"))


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


# -- includes, seeds, controls --------------------------------------------------------------------

def _recipe_with_include(tmp_path, include_text: str, recipe_extra: str = "") -> Path:
    (tmp_path / "bases").mkdir(exist_ok=True)
    (tmp_path / "bases" / "shared.yaml").write_text(include_text)
    text = NANO_RECIPE.read_text()
    head, _, stages = text.partition("stages:\n")
    # the data block and the first stages move to the included file
    head = head.split("data:\n")[0]
    stages = stages.split("  pretrain_dense:\n", 1)[1]
    return _write(tmp_path, head + "include: [bases/shared.yaml]\n" + recipe_extra + "stages:\n  pretrain_dense:\n" + stages)


SHARED = """\
data:
  sources:
    - {type: pydoc_topics, max_docs: 120}
    - {type: stdlib_code, max_files: 12, max_chunks_per_file: 4}
    - {type: arithmetic, n_docs: 150, max_digits: 2}
  noise: {boilerplate: 0.05, gibberish: 0.05, exact_duplicate: 0.05, near_duplicate: 0.05, spam: 0.05}
  split: {validation: 0.1, test: 0.1}
stages:
  corpus: {kind: corpus, method: standard_corpus}
  filter: {kind: select, method: heuristic_filter, inputs: {docs: corpus}}
  dedup: {kind: select, method: minhash_dedup, inputs: {docs: filter}}
  tokenize: {kind: tokenize, method: byte_bpe, inputs: {docs: dedup}, params: {vocab_size: 512, seq_len: 32}}
"""


def test_an_included_file_gives_the_same_digests_as_writing_it_out(tmp_path):
    _, inline = load_plan(NANO_RECIPE)
    _, included = load_plan(_recipe_with_include(tmp_path, SHARED))
    assert {n: s.digest for n, s in included.stages.items()} == {n: s.digest for n, s in inline.stages.items()}
    # overrides reach included stages; the file's own keys win over the include's
    _, over = load_plan(_recipe_with_include(tmp_path, SHARED), ["stages.tokenize.params.vocab_size=600"])
    assert over.stages["tokenize"].params["vocab_size"] == 600
    from flows.recipe import recipe_files

    assert [p.name for p in recipe_files(tmp_path / "r.yaml")] == ["r.yaml", "shared.yaml"]


def test_a_missing_or_cyclic_include_is_a_clear_error(tmp_path):
    p = _recipe_with_include(tmp_path, SHARED)
    p.write_text(p.read_text().replace("bases/shared.yaml", "bases/absent.yaml"))
    with pytest.raises(RecipeError, match=r"r\.yaml: include\[0\]: 'bases/absent\.yaml' does not exist"):
        load_recipe(p)
    p = _recipe_with_include(tmp_path, "include: [../r.yaml]\n" + SHARED)
    with pytest.raises(RecipeError, match=r"include cycle: r\.yaml -> shared\.yaml -> r\.yaml"):
        load_recipe(p)


def test_seeds_expand_exactly_the_seed_dependent_stages(tmp_path):
    p = _nano_with(tmp_path, "seed: 0", "seed: 0\nseeds: [0, 1, 2]")
    # MinHash takes a seed: pinned, as a shared data pipeline would, it stays one stage
    p.write_text(p.read_text().replace("method: minhash_dedup, inputs: {docs: filter}}",
                                       "method: minhash_dedup, inputs: {docs: filter}, params: {seed: 0}}"))
    _, single = load_plan(p, ["seeds=null"])
    _, plan = load_plan(p)
    trained = {"pretrain_dense", "pretrain_spdf", "finetune_spdf", "finetune_prose", "finetune_code", "distill"}
    downstream = {"quantize", "merge"}
    assert set(plan.seed_copies) == trained | downstream
    for name in ("corpus", "filter", "dedup", "tokenize"):  # the data stays fixed
        assert plan.stages[name].digest == single.stages[name].digest
    copies = plan.seed_copies["pretrain_dense"]
    assert copies == ["pretrain_dense_s0", "pretrain_dense_s1", "pretrain_dense_s2"]
    assert [plan.stages[c].params["seed"] for c in copies] == [0, 1, 2]
    assert plan.stages["pretrain_dense_s0"].digest == single.stages["pretrain_dense"].digest  # seed 0 is shared
    assert plan.stages["quantize_s2"].inputs == {"model": ["pretrain_dense_s2"]}
    assert plan.stages["merge_s1"].inputs["models"] == ["finetune_prose_s1", "finetune_code_s1"]
    assert len(plan.stages["evaluate"].inputs["models"]) == 6 * 3
    assert plan.stages["evaluate"].options["seeds"]["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("seeds, message", [("[]", "seeds is empty"), ("[0, 1, 1]", "seeds has duplicates"),
                                            ("[-1]", "seeds must be >= 0")])
def test_bad_seeds_are_named(tmp_path, seeds, message):
    with pytest.raises(RecipeError, match=rf"r\.yaml: seeds: .*{re.escape(message)}"):
        load_recipe(_nano_with(tmp_path, "seed: 0", f"seed: 0\nseeds: {seeds}"))


def test_a_seed_dependent_stage_in_a_one_stage_role_is_refused(tmp_path):
    p = _nano_with(tmp_path, "seed: 0", "seeds: [0, 1]\nseed: 0")
    p.write_text(p.read_text().replace("inputs:\n      tokens: tokenize\n", "inputs:\n      tokens: tokenize\n", 1))
    text = p.read_text().replace("  tokenize:\n    kind: tokenize\n    method: byte_bpe\n    inputs: {docs: dedup}",
                                 "  tokenize:\n    kind: tokenize\n    method: byte_bpe\n    inputs: {docs: dedup}")
    text = text.replace("  dedup: {kind: select, method: minhash_dedup, inputs: {docs: filter}}",
                        "  dedup: {kind: select, method: random, inputs: {docs: filter}, params: {keep_fraction: 0.9}}")
    p.write_text(text)
    with pytest.raises(RecipeError, match=r"stages\.evaluate\.inputs\.tokens: stage 'tokenize' depends on the seed"):
        load_recipe(p)


def test_a_claim_whose_control_names_a_missing_stage(tmp_path):
    p = _nano_with(tmp_path, "    than: pretrain_dense.size_bytes",
                   "    than: pretrain_dense.size_bytes\n    control: {replace: {quantize: rtn_missing}}")
    p.write_text(p.read_text().replace("    statement: \"RTN int4 stores the model in fewer bytes than fp32\"\n"
                                       "    kind: accounting\n", "    statement: \"x\"\n"))
    with pytest.raises(RecipeError, match=r"claims\[int4_smaller\]: its control's baseline refers to stage "
                                          r"'rtn_missing', which is neither evaluated"):
        load_recipe(p)


def test_an_experiment_claim_without_a_control_is_refused(tmp_path):
    p = _nano_with(tmp_path, "    kind: accounting\n    metric: quantize.size_bytes\n    op: \"<\"",
                   "    metric: quantize.size_bytes\n    op: \"<=\"")  # not strict: the baseline itself would pass
    with pytest.raises(RecipeError, match=r"claims\.1: .*an experiment claim needs a control"):
        load_recipe(p)


def test_seeds_without_a_seed_dependent_stage_are_refused():
    ptq = REPO / "tests" / "recipes" / "ptq_nano.yaml"
    pinned = ["seeds=[0, 1]", "stages.pretrain.params.seed=0", "stages.gptq_w3.params.seed=0",
              "stages.prune_wanda.params.seed=0", "stages.prune_sparsegpt_24.params.seed=0",
              "stages.double_rounding.params.seed=0", "stages.pela.params.seed=0",
              "stages.qfx.params.seed=0"]
    with pytest.raises(RecipeError, match=r"ptq_nano\.yaml: seeds: no stage depends on the seed"):
        load_plan(ptq, pinned)


def test_a_recipe_pairing_an_encoder_and_a_causal_objective_is_refused_when_it_compiles():
    path = REPO / "params" / "mosaicbert.yaml"
    with pytest.raises(RecipeError, match=r"stages\.alibi: model 'encoder_micro_alibi': a masked-LM encoder trains "
                                          r"with method 'mlm', not 'dense'"):
        load_plan(path, ["stages.alibi.method=dense", "stages.alibi.params={steps: 10}"])
    with pytest.raises(RecipeError, match=r"stages\.learned: model 'micro': method 'mlm' trains a masked-LM "
                                          r"encoder .* not a causal decoder"):
        load_plan(path, ["stages.learned.model=micro"])


# -- inputs that cannot work, refused before their upstream stages train ---------------------------

QAT_STAGES = """  qat:
    kind: pretrain
    method: qat
    inputs: {tokens: tokenize}
    params: {<<: *train, weight_format: ternary}
  quantize:
"""


@pytest.mark.parametrize("stage, message", [
    ("  prune_qat: {kind: prune, method: magnitude, inputs: {model: qat}, params: {sparsity: 0.5}}\n",
     r"stages\.prune_qat\.inputs\.model: stage 'qat' trains its weights onto a low-bit grid \(method qat\), so its "
     r"model is already quantized; prune the full-precision model"),
    ("  qat_again: {kind: finetune, method: l4q, inputs: {tokens: tokenize, model: quantize}, params: {steps: 2}}\n",
     r"stages\.qat_again\.inputs\.model: method 'l4q' trains the weights onto a low-bit grid, but stage 'quantize' "
     r"is a quantize stage; give it the full-precision model"),
    ("  bipft_student: {kind: distill, method: bipft_kd, inputs: {tokens: tokenize, teacher: pretrain_dense, "
     "student: qat}, params: {steps: 2}}\n",
     r"stages\.bipft_student\.inputs\.student: method 'bipft_kd' trains the weights onto a low-bit grid, but stage "
     r"'qat' trains its weights onto a low-bit grid"),
], ids=["prune", "finetune", "distill"])
def test_an_already_quantized_model_is_refused_where_it_would_be_quantized_again(tmp_path, capsys, stage, message):
    p = _nano_with(tmp_path, "  quantize:\n", QAT_STAGES.replace("  quantize:\n", stage + "  quantize:\n"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(p)
    assert main(["validate", str(p)]) == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_a_quantized_model_is_still_a_valid_input_where_nothing_quantizes_it_again(tmp_path):
    stages = QAT_STAGES.replace("  quantize:\n", "  lora_on_qat: {kind: finetune, method: lora, inputs: {tokens: "
                                "tokenize, model: qat}, params: {steps: 2}}\n  quantize:\n")
    _, plan = load_plan(_nano_with(tmp_path, "  quantize:\n", stages))
    assert {"qat", "lora_on_qat"} <= set(plan.stages)


@pytest.mark.parametrize("seq_len, refused", [(4, True), (5, False)])
def test_fim_blocks_too_short_for_a_middle_are_refused(tmp_path, seq_len, refused):
    stages = (f"  tokenize_short: {{kind: tokenize, method: byte_bpe, inputs: {{docs: dedup}}, params: {{vocab_size: "
              f"512, seq_len: {seq_len}}}}}\n  fim: {{kind: pretrain, method: fim, inputs: {{tokens: tokenize_short}}, "
              f"params: {{steps: 2, batch_size: 2}}}}\n  quantize:\n")
    p = _nano_with(tmp_path, "  quantize:\n", stages)
    if refused:
        with pytest.raises(RecipeError, match=r"stages\.fim: method 'fim' rearranges each block around 3 control tokens "
                                              r"and needs blocks of at least 5 tokens, but its tokens input "
                                              r"'tokenize_short' packs blocks of stages\.tokenize_short\.params\.seq_len=4"):
            load_recipe(p)
    else:
        assert "fim" in load_plan(p)[1].stages


@pytest.mark.parametrize("stage,refused", [
    # nano's block Linears are 64 wide on their narrow side
    ("{kind: finetune, method: lora, inputs: {tokens: tokenize, model: pretrain_dense}, params: {rank: 64, steps: 2}}",
     None),
    ("{kind: finetune, method: lora, inputs: {tokens: tokenize, model: pretrain_dense}, params: {rank: 65, steps: 2}}",
     r"rank=65 is larger than the block Linears of preset 'nano' allow \(min\(in, out\) = 64\)"),
    ("{kind: pretrain, method: galore, inputs: {tokens: tokenize}, params: {steps: 2}}",  # its default rank, 128
     r"rank=128 is larger than the block Linears of preset 'nano' allow \(min\(in, out\) = 64\)"),
    ("{kind: finetune, method: compacter, inputs: {tokens: tokenize, model: pretrain_dense}, "
     "params: {phm_dim: 4, rank: 17, steps: 2}}",
     r"rank=17 is larger than the block Linears of preset 'nano' allow \(min\(in, out\) / phm_dim=4 = 16\)"),
    # through a prune stage, which keeps its input's shape
    ("{kind: finetune, method: perp, inputs: {tokens: tokenize, model: pruned}, params: {rank: 100, steps: 2}}",
     r"rank=100 is larger than the block Linears of preset 'nano' allow"),
])
def test_a_rank_above_the_presets_widths_is_refused_before_anything_trains(tmp_path, stage, refused):
    stages = ("  pruned: {kind: prune, method: magnitude, inputs: {model: pretrain_dense}, params: {sparsity: 0.5}}\n"
              f"  low_rank: {stage}\n  quantize:\n")
    p = _nano_with(tmp_path, "  quantize:\n", stages)
    if refused:
        with pytest.raises(RecipeError, match=r"stages\.low_rank\.params\.rank: " + refused):
            load_recipe(p)
    else:
        assert "low_rank" in load_plan(p)[1].stages


@pytest.mark.parametrize("small,grow_to,refused", [
    ("micro_student", "micro", None),
    ("micro_student", "nano", r"growth: the target's hidden_size \(64\) is below the input's \(128\)"),
    ("nano", "micro_student", r"growth keeps head_dim: the input's 64/2 = 32, the target's 128/2 = 64"),
])
def test_growth_the_input_cannot_take_is_refused_before_anything_trains(tmp_path, small, grow_to, refused):
    stages = (f"  small: {{kind: pretrain, method: dense, model: {small}, inputs: {{tokens: tokenize}}, "
              f"params: {{steps: 2, batch_size: 2}}}}\n  grown: {{kind: finetune, method: bert2bert, "
              f"inputs: {{tokens: tokenize, model: small}}, params: {{grow_to: {grow_to}, steps: 2, batch_size: 2}}}}\n"
              "  quantize:\n")
    p = _nano_with(tmp_path, "  quantize:\n", stages)
    if refused:
        with pytest.raises(RecipeError, match=rf"stages\.grown\.params\.grow_to='{grow_to}': {refused} "
                                              rf"\(stage 'small''s model has the shape of preset '{small}'\)"):
            load_recipe(p)
    else:
        assert "grown" in load_plan(p)[1].stages


def test_scoring_checkpoints_that_no_model_keeps_is_refused(tmp_path):
    scored = _nano_with(tmp_path, "params: {lm_eval_limit: 8,", "params: {checkpoints: true, lm_eval_limit: 8,")
    with pytest.raises(RecipeError, match=r"stages\.evaluate\.params\.checkpoints: true scores the checkpoints that "
                                          r"its models' training stages keep, but none of pretrain_dense, .* sets "
                                          r"params\.keep_checkpoints"):
        load_recipe(scored)
    text = scored.read_text()
    assert "params: {<<: *train, sparsity: 0.75}" in text
    scored.write_text(text.replace("params: {<<: *train, sparsity: 0.75}",
                                   "params: {<<: *train, sparsity: 0.75, keep_checkpoints: [0.5]}"))
    assert load_plan(scored)[1].stages["evaluate"].params["checkpoints"] is True


def test_a_cross_stage_check_reports_a_bad_input_stage_by_its_own_key(tmp_path):
    """The quantized-input check reads its input stage's method: an input listed later with an
    unknown method is reported as that stage's error, not as a bare registry error."""
    p = _nano_with(tmp_path, "  quantize:\n", "  prune_x: {kind: prune, method: magnitude, inputs: {model: qatx}, "
                   "params: {sparsity: 0.5}}\n  qatx: {kind: pretrain, method: nope, inputs: {tokens: tokenize}}\n"
                   "  quantize:\n")
    with pytest.raises(RecipeError, match=r"stages\.qatx\.method: unknown pretrain method 'nope'"):
        load_recipe(p)
