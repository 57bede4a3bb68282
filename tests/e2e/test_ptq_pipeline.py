"""The quantize stage end to end: calibrated GPTQ and a W8A4 model through Prefect, MLflow and evaluate."""
from __future__ import annotations

import json

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
