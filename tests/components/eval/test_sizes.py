import pytest
import torch

from components.eval.sizes import model_size_report
from components.model.presets import build_model, count_params
from components.quant.rtn import RtnQuantizer


def test_fp32_report(tmp_path):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0)
    with torch.no_grad():  # prune half of one block Linear weight
        model.model.layers[0].mlp.up_proj.weight[:86] = 0.0
    model.save_pretrained(tmp_path)
    report = model_size_report(tmp_path)
    n_block_linear = 2 * (4 * 64 * 64 + 3 * 64 * 192)
    assert report["n_params"] == count_params(model)
    assert report["safetensors_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert 4 * report["n_params"] < report["safetensors_bytes"] < 4 * report["n_params"] + 20_000  # + header
    assert report["sparsity"] == pytest.approx(86 * 64 / n_block_linear)
    assert report["bits_per_weight"] == 32.0
    assert report["deploy_bytes"] == report["safetensors_bytes"] and report["packed_bytes"] is None


def test_quantized_report_uses_meta(tmp_path):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0)
    q = RtnQuantizer(RtnQuantizer.Params(bits=4, granularity="per_channel")).quantize(model)
    q.load_into(model)
    model.save_pretrained(tmp_path)
    report = model_size_report(tmp_path, quant_meta=q.meta)
    assert report["bits_per_weight"] == pytest.approx(q.meta["bits_per_weight"])
    assert 4 < report["bits_per_weight"] < 5
    assert report["packed_bytes"] == q.meta["packed_bytes"]
    assert report["deploy_bytes"] == (report["safetensors_bytes"] - q.meta["fp32_bytes_of_quantized"]
                                      + q.meta["packed_bytes"])
    assert report["deploy_bytes"] < report["safetensors_bytes"] / 2


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        model_size_report(tmp_path)
