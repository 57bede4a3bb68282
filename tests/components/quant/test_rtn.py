import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from components.model.presets import build_model
from components.quant.base import QUANT_CONFIG_ATTR, QuantizationError, dequantize_packed
from components.quant.packing import unpack_int
from components.quant.registry import QUANTIZERS
from components.quant.rtn import RtnQuantizer, quantize_tensor


def nano(seed=0):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed)


def rtn(**params):
    return RtnQuantizer(RtnQuantizer.Params(**params))


def wide_model():
    # nano widths (64, 192) are not multiples of 128; this one is, for the g128 size check.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_registry_entry():
    assert QUANTIZERS.get("rtn") is RtnQuantizer
    assert RtnQuantizer.paper.arxiv == "2210.17323"


@pytest.mark.parametrize("seed", range(5))
def test_int8_per_channel_error_within_half_step_and_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 48, generator=gen) * torch.rand(16, 1, generator=gen) * 3
    weight[3] = 0.0  # an all-zero row must stay exact
    codes, scales, zeros, dequant = quantize_tensor(weight, 8, "per_channel", 128, True, "w")
    assert zeros is None and scales.dtype == torch.float16 and scales.shape == (16, 1)
    step = scales.float()
    assert (step >= weight.abs().amax(dim=1, keepdim=True) / 127).all()  # stored scale rounded up
    assert ((weight - dequant).abs() <= step / 2 + 1e-7).all()
    reference = torch.clamp(torch.round(weight / step), -127, 127) * step
    assert torch.equal(dequant, reference)
    assert torch.equal(codes.to(torch.int16) - 128, torch.round(weight / step).to(torch.int16))
    assert torch.equal(dequant[3], torch.zeros(48))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_error_within_half_step(bits):
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(8, 64, generator=gen) + 0.5
    codes, scales, zeros, dequant = quantize_tensor(weight, bits, "group", 16, False, "w")
    assert zeros is not None and zeros.shape == scales.shape == (8, 4)
    assert int(codes.max()) < 2**bits
    step = scales.float().repeat_interleave(16, dim=1)
    assert ((weight - dequant).abs() <= step / 2 + 1e-6).all()


def test_int4_group_packing_round_trip_exact():
    model = nano()
    q = rtn(bits=4, granularity="group", group_size=4, symmetric=False).quantize(model)
    name = "model.layers.1.mlp.down_proj.weight"
    shape = tuple(q.meta["shapes"][name])
    assert shape == (64, 192)
    assert q.packed[f"{name}.qweight"].dtype == torch.uint8
    assert q.packed[f"{name}.qweight"].numel() == 64 * 192 // 2
    assert q.packed[f"{name}.scales"].shape == (64, 48)
    rebuilt = dequantize_packed(q.packed, name, shape, bits=4)
    assert torch.equal(rebuilt, q.state_dict[name])
    # and from the direct quantizer codes
    codes, *_ = quantize_tensor(model.state_dict()[name], 4, "group", 4, False, name)
    assert torch.equal(unpack_int(q.packed[f"{name}.qweight"], 4, codes.numel()), codes.reshape(-1))


def test_dequantized_state_dict_loads_and_saves_with_plain_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = nano()
    q = rtn(bits=4, granularity="per_channel").quantize(model)
    assert set(q.state_dict) == set(model.state_dict())
    # lm_head, embeddings and norms are untouched
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(q.state_dict[key], model.state_dict()[key])
    assert len(q.meta["quantized_tensors"]) == 14  # 7 Linear layers x 2 blocks

    fresh = LlamaForCausalLM(model.config)
    q.load_into(fresh)
    assert getattr(fresh.config, QUANT_CONFIG_ATTR)["bits"] == 4
    fresh.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), torch_dtype=torch.float32)
    for key, value in q.state_dict.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the marker survives saving, so the reloaded model is refused
    with pytest.raises(QuantizationError, match="already quantized"):
        rtn(bits=8).quantize(loaded)


def test_bits_per_weight_int4_g128_includes_scales(tmp_path):
    model = wide_model()
    q = rtn(bits=4, granularity="group", group_size=128).quantize(model)
    n = q.meta["n_quantized_weights"]
    assert n == 4 * 128 * 128 + 3 * 128 * 256
    # 4 bits per code + one fp16 scale per 128 weights = 4.125 bits, exactly
    assert q.meta["packed_bytes"] == n // 2 + 2 * (n // 128)
    assert q.meta["bits_per_weight"] == pytest.approx(4.125)
    assert q.meta["fp32_bytes_of_quantized"] == 4 * n
    assert q.meta["packed_bytes"] == sum(t.numel() * t.element_size() for t in q.packed.values())
    q.save_packed(tmp_path / "packed.safetensors")
    assert (tmp_path / "packed.safetensors").stat().st_size >= q.meta["packed_bytes"]

    asym = rtn(bits=4, granularity="group", group_size=128, symmetric=False).quantize(model)
    assert asym.meta["bits_per_weight"] == pytest.approx(4.1875)  # + a uint8 zero point per group

    three = rtn(bits=3, granularity="group", group_size=128).quantize(model)
    assert three.meta["bits_per_weight"] == pytest.approx(3.125)


def test_int8_output_closer_to_fp32_than_int4():
    model = nano()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        mse = {}
        for bits in (8, 4):
            quantized = LlamaForCausalLM(model.config)
            quantized.load_state_dict(rtn(bits=bits, granularity="per_channel").quantize(model).state_dict)
            mse[bits] = float(((quantized(input_ids=ids).logits - reference) ** 2).mean())
    assert 0 < mse[8] < mse[4] / 10


def test_targets_select_layers():
    q = rtn(bits=8, granularity="per_tensor", targets=["mlp.down_proj"]).quantize(nano())
    assert q.meta["quantized_tensors"] == ["model.layers.0.mlp.down_proj.weight",
                                          "model.layers.1.mlp.down_proj.weight"]
    assert q.packed["model.layers.0.mlp.down_proj.weight.scales"].shape == (1, 1)


def test_bad_bits_is_a_params_error_and_a_runtime_error():
    with pytest.raises(ValidationError, match="bits"):
        RtnQuantizer.Params(bits=9)
    with pytest.raises(ValidationError, match="group_size"):
        RtnQuantizer.Params(group_size=0)
    unchecked = RtnQuantizer(RtnQuantizer.Params.model_construct(bits=9, granularity="per_channel",
                                                                  group_size=128, symmetric=True, targets=None))
    with pytest.raises(QuantizationError, match=r"bits=9.*supported bits: \[1, 2, 3, 4, 5, 6, 7, 8\]"):
        unchecked.quantize(nano())


def test_group_size_must_divide_width():
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*group_size=128.*width 64"):
        rtn(bits=4, granularity="group", group_size=128).quantize(nano())


def test_no_matching_linear_layers():
    with pytest.raises(QuantizationError, match="no nn.Linear modules matching"):
        rtn(bits=8, targets=["not_a_layer"]).quantize(nano())

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = nano().config
            self.lm_head = torch.nn.Linear(4, 4)

    with pytest.raises(QuantizationError, match=r"NoBlocks has no nn.Linear modules under .model\.layers\.\*.; nothing to quantize"):
        rtn(bits=8).quantize(NoBlocks())


def test_refuses_already_quantized_model():
    model = nano()
    setattr(model.config, QUANT_CONFIG_ATTR, {"scheme": "rtn", "bits": 8})
    with pytest.raises(QuantizationError, match="already quantized"):
        rtn(bits=4, granularity="per_channel").quantize(model)
