"""The quantize stage end to end: calibrated GPTQ and a W8A4 model through Prefect, MLflow and evaluate."""
from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from flows.cli import main
from tests.helpers import REPO, make_workspace

pytestmark = pytest.mark.e2e
RECIPE = REPO / "tests" / "recipes" / "ptq_nano.yaml"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = make_workspace(tmp_path_factory.mktemp("ptq") / "ws", {"ptq_nano": RECIPE})
    with prefect_test_harness(server_startup_timeout=180):
        assert main(["--workspace", str(root), "run", "ptq_nano", "--no-progress"]) == 0
        yield root


def _artifact(ws, stage: str):
    for manifest in (ws / "artifacts").glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        if data.get("stage") == stage:
            return manifest.parent
    raise AssertionError(f"no artifact for stage {stage}")


def test_gptq_artifact_is_calibrated_packed_and_beats_rtn_per_layer(ws):
    art = _artifact(ws, "gptq_w3")
    facts = json.loads((art / "paperdag.json").read_text())["quantization"]
    assert facts["scheme"] == "gptq" and facts["bits"] == 3
    assert facts["metrics"]["layers_better_than_rtn"] == facts["metrics"]["layers_quantized"] == 14
    packed = load_file(str(art / "quantized.safetensors"))
    assert packed["model.layers.0.mlp.down_proj.weight.qweight"].numel() == 64 * 192 * 3 // 8


def test_activation_quantized_model_is_evaluated_through_its_hooks(ws):
    metrics = json.loads((_artifact(ws, "evaluate") / "metrics.json").read_text())["models"]
    assert metrics["rtn_w8a4"]["activation_bits"] == 4 and "activation_bits" not in metrics["rtn_w8"]
    # same W8 weights; only the A4 hooks differ, and they must move the loss
    assert metrics["rtn_w8a4"]["loss_all"] != pytest.approx(metrics["rtn_w8"]["loss_all"], abs=1e-6)
    assert 0 <= metrics["rtn_w8a4"]["arith_exact_match"] <= 1
    art = _artifact(ws, "rtn_w8a4")
    assert (art / "activation.safetensors").exists()
    assert json.loads((art / "config.json").read_text())["paperdag_quantization"]["activation_bits"] == 4


def test_calibrated_method_without_tokens_is_a_recipe_error(ws, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("inputs: {model: pretrain, tokens: tokenize}", "inputs: {model: pretrain}"))
    assert main(["validate", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "stages.gptq_w3.inputs" in err and "calibrates on token data" in err


def test_pruned_models_hit_their_pattern_load_in_transformers_and_stay_sparse_through_rtn(ws):
    import torch
    from transformers import AutoModelForCausalLM

    for stage, method in (("prune_magnitude", "magnitude"), ("prune_wanda", "wanda"),
                          ("prune_sparsegpt_24", "sparsegpt")):
        art = _artifact(ws, stage)
        facts = json.loads((art / "paperdag.json").read_text())["pruning"]
        assert facts["pruned_layers"] == 14 and facts["sparsity"] == pytest.approx(0.5)
        weights = load_file(str(art / "model.safetensors"))
        for layer, measured in facts["layers"].items():  # what the facts say is what the file holds
            w = weights[f"{layer}.weight"]
            assert measured["sparsity"] == pytest.approx(float((w == 0).float().mean()))
        model = AutoModelForCausalLM.from_pretrained(str(art))
        with torch.no_grad():
            assert torch.isfinite(model(torch.arange(16).unsqueeze(0)).logits).all(), method
    sparse = load_file(str(_artifact(ws, "prune_sparsegpt_24") / "model.safetensors"))
    down = sparse["model.layers.0.mlp.down_proj.weight"]
    assert ((down.reshape(down.shape[0], -1, 4) != 0).sum(dim=2) <= 2).all()  # 2:4 in the file
    quantized = load_file(str(_artifact(ws, "sparsegpt_24_w8") / "model.safetensors"))
    for name, w in sparse.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert (quantized[name][w == 0] == 0).all(), name  # RTN keeps every pruned weight at zero


def test_calibrated_pruning_reconstructs_better_than_magnitude_per_layer(ws):
    metrics = json.loads((_artifact(ws, "prune_sparsegpt_24") / "stage_metrics.json").read_text())
    layers = [k.removeprefix("output_mse.") for k in metrics if k.startswith("output_mse.")]
    assert len(layers) == 14
    assert metrics["layers_better_than_magnitude"] == 14, {
        n: (metrics[f"output_mse.{n}"], metrics[f"magnitude_output_mse.{n}"]) for n in layers}
    evaluation = json.loads((_artifact(ws, "evaluate") / "metrics.json").read_text())["models"]
    for model in ("prune_magnitude", "prune_wanda", "prune_sparsegpt_24", "sparsegpt_24_w8"):
        assert math.isfinite(evaluation[model]["ppl_all"]) and evaluation[model]["ppl_all"] > 1, model


def test_bit_switch_rebuilds_the_lower_width_from_the_stored_codes_and_is_evaluated(ws):
    import torch

    from components.quant.base import dequantize_packed
    from components.quant.bit_switch import double_round

    trained = _artifact(ws, "double_rounding")
    facts = json.loads((trained / "paperdag.json").read_text())
    assert facts["bit_widths"] == [8, 4, 2] and facts["quantization"]["scheme"] == "double_rounding"
    stored = load_file(str(trained / "quantized.safetensors"))
    switched = load_file(str(_artifact(ws, "switch_w4") / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    codes = dequantize_packed(stored, name, tuple(switched[name].shape), 8, 128) / stored[f"{name}.scales"]
    expected = double_round(torch.round(codes), 8, 4) * (16 * stored[f"{name}.scales"])
    assert torch.equal(switched[name], expected)
    metrics = json.loads((_artifact(ws, "evaluate") / "metrics.json").read_text())["models"]
    # the stored codes and the switched ones are what each model's size counts (plus a step per row)
    assert 8 < metrics["double_rounding"]["bits_per_weight"] < 8.5 and 4 < metrics["switch_w4"]["bits_per_weight"] < 4.5
    assert math.isfinite(metrics["switch_w4"]["ppl_all"])


def test_bit_switch_of_a_model_without_stored_codes_fails_naming_the_file(ws, tmp_path, capsys):
    bad = tmp_path / "switch_dense.yaml"
    bad.write_text(RECIPE.read_text().replace("name: ptq_nano", "name: switch_dense")
                   .replace("inputs: {model: double_rounding}", "inputs: {model: pretrain}"))
    assert main(["--workspace", str(ws), "run", str(bad), "--no-progress", "--only", "switch_w4"]) != 0
    err = capsys.readouterr().err
    assert "quantized.safetensors does not exist: the input model stores no packed low-bit codes" in err


def test_pela_saves_a_plain_model_of_rank_r_layers_and_is_evaluated(ws):
    import torch

    art = _artifact(ws, "pela")
    facts = json.loads((art / "paperdag.json").read_text())
    assert facts["pela_layers"] == 14 and facts["low_rank_params"] < 0.52 * facts["replaced_dense_params"]
    weight = load_file(str(art / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert weight.shape == (192, 64)
    assert torch.linalg.matrix_rank(weight).item() == facts["pela_ranks"]["model.layers.0.mlp.gate_proj"] == 24
    metrics = json.loads((_artifact(ws, "evaluate") / "metrics.json").read_text())["models"]
    assert math.isfinite(metrics["pela"]["ppl_all"])


def test_qfx_saves_a_plain_model_on_its_fixed_point_grids_with_the_packed_codes(ws):
    import torch

    art = _artifact(ws, "qfx")
    facts = json.loads((art / "paperdag.json").read_text())
    assert facts["quantization"]["scheme"] == "fixed_point" and facts["bits"] == 4
    weights = load_file(str(art / "model.safetensors"))
    for layer, f in facts["frac_bits"].items():  # every weight an integer in -8..7 times 2^-f
        codes = weights[f"{layer}.weight"] * 2.0 ** f
        assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7
    metrics = json.loads((_artifact(ws, "evaluate") / "metrics.json").read_text())["models"]
    assert 4 <= metrics["qfx"]["bits_per_weight"] < 4.01  # the codes plus one fp32 scale per tensor
    assert math.isfinite(metrics["qfx"]["ppl_all"])
