import copy

import pytest
import torch

from components.quant.base import QuantizationError, dequantize_packed
from components.quant.fliqs import DEFAULT_FORMATS, FliqsQuantizer, FormatBank, random_feasible_assignment
from components.quant.calibration import swapped_weights
from components.quant.minifloat_ptq import dequantize_minifloat, mean_loss
from components.quant.registry import QUANTIZERS
from tests.components.quant.strided_task import nano, strided, trained_nano

# (outlier layer, the layer feeding its input channel 0): the pair is rescaled without changing the function
OUTLIERS = [("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"),
            ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj")]
SENSITIVE = [name for name, _ in OUTLIERS]
OUTLIER_FACTOR = 16.0


@pytest.fixture(scope="module")
def trained():
    """A nano model trained on strided sequences, then two layers get a 16x outlier input column,
    with the producing row scaled down by 16 so the fp model computes the same function
    (SwiGLU is linear in up_proj). Per-channel int4 crushes every other
    weight of those rows; the fp8 formats do not: which layers get 4 bits matters."""
    model = trained_nano()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, producer in OUTLIERS:
            modules[name].weight[:, 0] *= OUTLIER_FACTOR
            modules[producer].weight[0, :] /= OUTLIER_FACTOR
    return model.eval()


def fliqs(**params):
    return FliqsQuantizer(FliqsQuantizer.Params(**{"search_sequences": 16, "iterations": 25, **params}))


def test_registered_with_paper():
    assert QUANTIZERS.get("fliqs") is FliqsQuantizer
    assert FliqsQuantizer.needs_calibration and FliqsQuantizer.paper.arxiv == "2308.03290"
    assert FliqsQuantizer.Params().formats == DEFAULT_FORMATS


@pytest.mark.parametrize("budget", [4.5, 6.0, 7.0])
def test_respects_the_budget_and_packs_each_layer_in_its_format(trained, budget):
    cal = strided(16, 1)
    q = fliqs(size_budget_bits=budget, iterations=10).quantize(copy.deepcopy(trained), cal)
    m = q.meta["metrics"]
    sizes = {n: q.meta["tensors"][n]["shape"][0] * q.meta["tensors"][n]["shape"][1] for n in q.meta["tensors"]}
    code_bits = sum(q.meta["tensors"][n]["bits"] * sizes[n] for n in sizes) / sum(sizes.values())
    assert code_bits <= budget and m["average_code_bits"] == pytest.approx(code_bits)
    assert q.meta["bits"] == pytest.approx(code_bits)
    assert q.meta["bits_per_weight"] > code_bits  # plus the fp16 scales
    assert sum(m[f"layers_{f}"] for f in DEFAULT_FORMATS) == 14
    for name, info in q.meta["tensors"].items():
        fmt = q.meta["allocation"][name.removesuffix(".weight")]
        if fmt.startswith("int"):
            assert info["format"] == "int" and info["bits"] == int(fmt[3:])
            rebuilt = dequantize_packed(q.packed, name, tuple(info["shape"]), info["bits"], info["zero_point"])
        else:
            assert info["format"] == fmt and info["bits"] == 8
            rebuilt = dequantize_minifloat(q.packed, name, info)
        assert torch.equal(rebuilt, q.state_dict[name]), name
    assert m["final_reward"] == pytest.approx(-m["calibration_loss"])  # feasible: no penalty


def test_choice_beats_random_feasible_assignments(trained):
    cal = strided(16, 1)
    model = copy.deepcopy(trained)
    q = fliqs(size_budget_bits=6.0).quantize(model, cal)
    q.load_into(model)
    chosen = mean_loss(model, cal)
    assert chosen == pytest.approx(q.meta["metrics"]["calibration_loss"])
    linears = dict(FliqsQuantizer().target_linears(trained))
    bank = FormatBank(linears, DEFAULT_FORMATS, "per_channel", 128)
    gen = torch.Generator().manual_seed(0)
    random_losses = []
    for _ in range(8):
        a = random_feasible_assignment(len(bank.names), bank.bits, bank.sizes.tolist(), 6.0, gen)
        assert bank.average_bits(a) <= 6.0
        with swapped_weights(linears, {n: bank.dequant(n, i) for n, i in zip(bank.names, a)}):
            random_losses.append(mean_loss(trained, cal))
    random_losses.sort()
    assert chosen < sum(random_losses) / len(random_losses)
    assert chosen < random_losses[len(random_losses) // 2]
    # and the outlier layers keep an 8-bit format (int4 crushes them)
    for name in SENSITIVE:
        assert q.meta["allocation"][name] != "int4", name
    # uniform int4 is feasible too, and much worse
    with swapped_weights(linears, {n: bank.dequant(n, 0) for n in bank.names}):
        assert chosen < mean_loss(trained, cal)


def test_deterministic_at_a_fixed_seed(trained):
    cal = strided(16, 1)
    a = fliqs(iterations=12, seed=3).quantize(copy.deepcopy(trained), cal)
    b = fliqs(iterations=12, seed=3).quantize(copy.deepcopy(trained), cal)
    assert a.meta["allocation"] == b.meta["allocation"]
    assert a.meta["search"]["final_probabilities"] == b.meta["search"]["final_probabilities"]
    ma, mb = dict(a.meta["metrics"]), dict(b.meta["metrics"])
    ma.pop("search_seconds"), mb.pop("search_seconds")
    assert ma == mb
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])


def test_errors():
    model = nano()
    cal = strided(4, 0)
    with pytest.raises(QuantizationError, match="below the cheapest"):
        fliqs(size_budget_bits=3.5).quantize(model, cal)
    with pytest.raises(ValueError, match="unknown minifloat"):
        FliqsQuantizer.Params(formats=["int4", "fp16"])
    with pytest.raises(ValueError, match="2..8 bits"):
        FliqsQuantizer.Params(formats=["int4", "int16"])
    with pytest.raises(ValueError, match="duplicates"):
        FliqsQuantizer.Params(formats=["int4", "int4"])
    with pytest.raises(QuantizationError, match="needs calibration"):
        fliqs().quantize(model, None)
