"""Quantize artifacts written as compressed-tensors: transformers loads them quantized, and they
compute exactly what the artifact computes; grids with no equivalent are refused, named."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from components.model.presets import build_model
from components.quant.rtn import RtnQuantizer
from tasks.export_compressed import (
    ExportFormatError,
    export_compressed_tensors,
    quantization_layout,
)
from tasks.model_io import save_model_artifact


def quantize_artifact(tmp_path, char_tokenizer, **params):
    """A quantize stage's output, made the way tasks/quantize.py makes it."""
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0).eval()
    method = RtnQuantizer(RtnQuantizer.Params(**params))
    quantized = method.with_activations(method.quantize(model))
    quantized.load_into(model)
    out = tmp_path / "artifact"
    out.mkdir()
    quantized.save_packed(out / "quantized.safetensors")
    save_model_artifact(model, char_tokenizer, out, {"kind": "quantize", "quantization": quantized.meta})
    return out


@pytest.mark.parametrize("params, stored_format", [
    ({"bits": 3, "granularity": "per_channel"}, "pack-quantized"),
    ({"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}, "int-quantized"),
])
def test_an_integer_grid_loads_quantized_and_computes_the_same(tmp_path, char_tokenizer, params, stored_format):
    artifact = quantize_artifact(tmp_path, char_tokenizer, **params)
    export_compressed_tensors(artifact, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == stored_format
    [group] = config["config_groups"].values()
    assert group["weights"]["num_bits"] == params["bits"] and len(group["targets"]) == 14  # 2 blocks x 7 Linears
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    original = AutoModelForCausalLM.from_pretrained(artifact)
    ids = torch.arange(4, 20).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, original(ids).logits)


def test_binary_sign_codes_export_on_the_two_bit_grid_and_compute_the_same(tmp_path, char_tokenizer):
    """One-bit sign codes (BiPFT, binary QAT) have no 1-bit compressed-tensors grid; they go out as
    codes of ±1 on the symmetric 2-bit grid, losslessly."""
    from components.quant.base import PackedWeights, QuantizedModel
    from components.quant.fake_quant import binarize
    from components.train.method import block_linears

    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0).eval()
    store = PackedWeights()
    with torch.no_grad():
        for name, linear in sorted(block_linears(model).items()):
            linear.weight.copy_(binarize(linear.weight, -1))  # sign x mean|w| per output channel
            store.add_sign(f"{name}.weight", linear.weight, "per_channel")
    out = tmp_path / "artifact"
    out.mkdir()
    QuantizedModel(state_dict={}, packed=store.packed, meta=store.meta("qat")).save_packed(out / "quantized.safetensors")
    save_model_artifact(model, char_tokenizer, out, {"kind": "pretrain", "quantization": store.meta("qat")})
    export_compressed_tensors(out, tmp_path / "ct")
    [group] = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 2 and group["weights"]["symmetric"] and len(group["targets"]) == 14
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = torch.arange(4, 20).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids).logits)


def test_grids_without_an_equivalent_are_refused_with_the_reason(tmp_path, char_tokenizer):
    w8a8 = quantize_artifact(tmp_path, char_tokenizer, bits=8, granularity="per_channel", activations={"bits": 8})
    with pytest.raises(ExportFormatError, match="also quantizes activations \\(W8A8\\)"):
        export_compressed_tensors(w8a8, tmp_path / "ct")
    facts = {"quantization": {"tensors": {"model.layers.0.mlp.up_proj.weight": {
        "format": "e2m1", "bits": 4, "granularity": None, "symmetric": None}}}}
    with pytest.raises(ExportFormatError, match="up_proj.weight is quantized to the 'e2m1' grid"):
        quantization_layout(facts, tmp_path)
    bipft = {"binary_network": {"estimators": True}, "quantization": {"tensors": {"model.layers.0.mlp.up_proj.weight": {
        "format": "sign", "bits": 1, "granularity": "per_tensor", "symmetric": True}}}}
    with pytest.raises(ExportFormatError, match=r"has modules beside its weights \(binary_network\)"):
        quantization_layout(bipft, tmp_path)
    with pytest.raises(ExportFormatError, match="not a quantized model artifact"):
        quantization_layout({"kind": "pretrain"}, tmp_path)
    assert not (tmp_path / "ct").exists()


def test_codes_that_do_not_describe_the_model_are_refused(tmp_path, char_tokenizer):
    artifact = quantize_artifact(tmp_path, char_tokenizer, bits=4, granularity="per_channel")
    other = build_model("nano", vocab_size=64, max_seq_len=32, seed=1)  # weights the codes do not encode
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(artifact / "model.safetensors"))
    with pytest.raises(ExportFormatError, match="decoded from its codes differs from the model's weight"):
        export_compressed_tensors(artifact, tmp_path / "ct")
