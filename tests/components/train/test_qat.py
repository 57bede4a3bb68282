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
