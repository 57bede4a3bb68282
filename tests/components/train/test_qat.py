"""Quantization-aware training: the model trains through fake-quantized weights, the folded artifact
computes exactly what the trained model computed with every weight on its grid, and a resume is exact."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.train.qat import QuantAwareTraining
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def qat(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32")
    params.update(overrides)
    config = QuantAwareTraining.Params(**params)
    return config, QuantAwareTraining(config)


def levels(weight: torch.Tensor, per_row: bool) -> int:
    """Most distinct values in one scale-sharing set (a row, or the whole tensor)."""
    return max(r.unique().numel() for r in weight) if per_row else weight.unique().numel()


@pytest.mark.parametrize("fmt, granularity, bits, max_levels", [
    ("ternary", "per_tensor", 4, 3), ("binary", "per_channel", 4, 2), ("int", "per_channel", 3, 7)])
def test_trained_weights_fold_onto_their_grid_and_compute_what_training_computed(fmt, granularity, bits, max_levels):
    batch = torch.from_numpy(pattern_blocks()[:4].astype("int64"))
    trained = {}

    class Capture(QuantAwareTraining):  # the fake-quantized model's output just before folding
        def finalize(self, model):
            with torch.no_grad():
                trained["logits"] = model.eval()(input_ids=batch).logits
            return super().finalize(model)

    config, _ = qat(weight_format=fmt, granularity=granularity, bits=bits)
    model, base = nano(), nano()
    result = train(model, pattern_blocks(), config, Capture(config), progress=False)
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5]), fmt  # the master weights learn through the STE
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert levels(module.weight, granularity == "per_channel") <= max_levels, name
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=batch).logits, trained["logits"])
    assert result.method_facts["quantized_layers"] == 14 and result.method_facts["weight_format"] == fmt


def test_a_qat_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: qat(steps=12, checkpoint_every=4))


def test_groups_need_an_int_grid():
    with pytest.raises(ValidationError, match="granularity=group needs weight_format=int"):
        QuantAwareTraining.Params(weight_format="ternary", granularity="group")
    QuantAwareTraining.Params(weight_format="int", granularity="group", group_size=32)


@pytest.mark.parametrize("fmt, granularity, bits", [("ternary", "per_tensor", 4), ("int", "group", 4),
                                                    ("binary", "per_channel", 4)])
def test_the_packed_file_dequantizes_to_the_trained_weights(tmp_path, fmt, granularity, bits):
    from safetensors.torch import load_file

    from components.quant.base import decode_packed

    config, method = qat(steps=6, weight_format=fmt, granularity=granularity, bits=bits, group_size=32)
    model = nano()
    train(model, pattern_blocks(), config, method, progress=False)
    quantized = method.pack(model)
    quantized.save_packed(tmp_path / "quantized.safetensors")
    packed = load_file(tmp_path / "quantized.safetensors")
    meta = quantized.meta
    assert meta["bits"] == {"ternary": 2, "int": 4, "binary": 1}[fmt] and len(meta["quantized_tensors"]) == 14
    for name in meta["quantized_tensors"]:
        weight = model.get_parameter(name).detach()
        restored = decode_packed(packed, name, meta["tensors"][name])
        assert torch.allclose(restored, weight, rtol=1e-6, atol=0), name
        assert torch.equal(restored, quantized.state_dict[name]), name
    # codes at their width plus the fp32 scales: a ternary nano block stores ~2 bits per weight
    if fmt == "binary":  # one sign bit per weight plus one fp32 scale per output channel, exactly
        shapes = [model.get_parameter(n).shape for n in meta["quantized_tensors"]]
        assert meta["bits_per_weight"] == sum(o * i + 32 * o for o, i in shapes) / sum(o * i for o, i in shapes)
    else:
        assert meta["bits_per_weight"] < (2.1 if fmt == "ternary" else 5.1)


def test_a_weight_off_the_grid_is_not_packed():
    from components.train.qat import QatPackError

    config, method = qat(weight_format="ternary")
    with pytest.raises(QatPackError, match=r"model\.layers\.0\..*\.weight is not on the ternary grid"):
        method.pack(nano())  # an untrained model: its weights are not ternary
    config, method = qat(weight_format="binary")
    with pytest.raises(QatPackError, match=r"model\.layers\.0\..*\.weight is not a binary weight"):
        method.pack(nano())


def test_a_group_size_that_does_not_divide_a_layer_is_refused():
    with pytest.raises(ValueError, match=r"params\.group_size=48 does not divide the input width of"):
        train(nano(), pattern_blocks(), *qat(weight_format="int", granularity="group", group_size=48), progress=False)
