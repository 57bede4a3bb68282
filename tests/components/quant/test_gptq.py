import pytest
import torch

from components.model.presets import build_model
from components.quant.base import QUANT_CONFIG_ATTR, QuantizationError, dequantize_packed
from components.quant.gptq import GptqQuantizer
from components.quant.registry import QUANTIZERS
from components.quant.rtn import RtnQuantizer


def nano(seed=0):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed)


def calibration(n=16, seed=0):
    return torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(seed))


def gptq(**params):
    return GptqQuantizer(GptqQuantizer.Params(**{"batch_size": 4, **params}))


def test_registered_with_paper():
    assert QUANTIZERS.get("gptq") is GptqQuantizer
    assert GptqQuantizer.needs_calibration and GptqQuantizer.paper.arxiv == "2210.17323"


@pytest.mark.parametrize("bits,granularity,true_sequential", [(4, "per_channel", False), (3, "per_channel", False),
                                                             (4, "per_tensor", False), (3, "per_channel", True)])
def test_every_layer_output_error_below_rtn(bits, granularity, true_sequential):
    q = gptq(bits=bits, granularity=granularity, true_sequential=true_sequential).quantize(nano(), calibration())
    m = q.meta["metrics"]
    assert m["layers_quantized"] == 14  # 7 Linears x 2 blocks
    for name in q.meta["quantized_tensors"]:
        layer = name.removesuffix(".weight")
        assert m[f"output_mse.{layer}"] < m[f"rtn_output_mse.{layer}"], layer


def test_model_loss_on_calibration_beats_rtn_at_3_bits():
    tokens = calibration(32)
    fp = nano()
    with torch.no_grad():
        base = fp(input_ids=tokens, labels=tokens).loss.item()
    losses = {}
    for name, quantizer in [("gptq", gptq(bits=3, granularity="per_channel")),
                            ("rtn", RtnQuantizer(RtnQuantizer.Params(bits=3, granularity="per_channel")))]:
        model = nano()
        quantizer.quantize(model, tokens).load_into(model)
        with torch.no_grad():
            losses[name] = model(input_ids=tokens, labels=tokens).loss.item()
    assert abs(losses["gptq"] - base) < abs(losses["rtn"] - base)


def test_packed_codes_reproduce_the_loaded_weights():
    model = nano()
    q = gptq(bits=4, granularity="group", group_size=32, symmetric=False).quantize(model, calibration())
    for name in q.meta["quantized_tensors"]:
        shape = tuple(q.meta["shapes"][name])
        rebuilt = dequantize_packed(q.packed, name, shape, bits=4)
        assert torch.equal(rebuilt, q.state_dict[name]), name
    assert q.meta["bits_per_weight"] > 4.0  # codes plus one fp16 scale and zero per 32 weights
    q.load_into(model)
    assert getattr(model.config, QUANT_CONFIG_ATTR)["scheme"] == "gptq"


def test_bad_input_is_refused_naming_the_problem():
    with pytest.raises(QuantizationError, match="needs calibration data"):
        gptq().quantize(nano(), None)
    with pytest.raises(QuantizationError, match="too small"):
        gptq().quantize(nano(), torch.zeros((0, 32), dtype=torch.long))
    with pytest.raises(QuantizationError, match="group_size=48 does not divide"):
        gptq(granularity="group", group_size=48).quantize(nano(), calibration())
    model = nano()
    gptq(bits=8, granularity="per_channel").quantize(model, calibration()).load_into(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        gptq().quantize(model, calibration())
    with pytest.raises(QuantizationError, match="no nn.Linear modules matching"):
        gptq(targets=["nonexistent_proj"]).quantize(nano(), calibration())
