import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from components.model.presets import build_model
from components.quant.base import QuantizationError
from components.quant.interlayer_hessian import InterlayerHessianQuantizer
from components.quant.registry import QUANTIZERS
from components.quant.sensitivity import (allocate_bits_pairwise, allocation_cost, allocation_size, loss_fn, pairwise_loss_terms,
                                          rtn_quantize)

DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def model():
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=0)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))


def iq(**params):
    params.setdefault("hutchinson_samples", 4)
    return InterlayerHessianQuantizer(InterlayerHessianQuantizer.Params(**params))


def loaded(model, q):
    fresh = LlamaForCausalLM(model.config)
    fresh.load_state_dict(q.state_dict)
    return fresh


def test_registry_entry():
    assert QUANTIZERS.get("interlayer_hessian") is InterlayerHessianQuantizer
    assert InterlayerHessianQuantizer.paper.arxiv == "2306.04879"


def test_size_budget_respected_and_meta(model, calibration):
    q = iq(average_bits=3.0).quantize(model, calibration)
    alloc = q.meta["allocation"]
    assert len(alloc) == 14 and set(alloc.values()) <= {2, 4, 8}
    assert q.meta["bits"] <= 3.0 + 1e-9
    assert q.meta["units"] == {m: [m] for m in alloc}  # 14 Linears <= 16: one unit each
    assert q.meta["pair_bits"] == [2, 4]
    # 1 base + 14 units x 3 widths + 91 pairs x 2² pair widths
    assert q.meta["metrics"]["loss_evaluations"] == 1 + 14 * 3 + 91 * 4
    for m, b in alloc.items():
        assert q.meta["metrics"][f"bits.{m}"] == b == q.meta["tensors"][f"{m}.weight"]["bits"]


def test_two_units_predicted_loss_is_exact(model, calibration):
    # With two units and every width's pair measured, c_1 + c_2 + Δ_12 is the measured loss of
    # the chosen configuration itself, so the prediction must match a fresh measurement.
    for average_bits in (3.0, 5.0):
        q = iq(targets=["mlp.down_proj"], diagonal="measured", pair_bits=[2, 4, 8], pair_sequences=4,
               average_bits=average_bits).quantize(model, calibration)
        tokens = calibration[:4]
        actual = loss_fn(loaded(model, q), tokens) - loss_fn(model, tokens)
        assert q.meta["metrics"]["predicted_loss_increase"] == pytest.approx(actual, abs=1e-5)
        assert q.meta["bits"] <= average_bits


def test_allocation_is_the_exact_optimum_of_the_measured_model(model, calibration):
    targets = ["mlp.down_proj", "self_attn.o_proj"]
    q = iq(targets=targets, diagonal="measured", pair_sequences=4, average_bits=4.0).quantize(model, calibration)
    units = q.meta["units"]
    terms = pairwise_loss_terms(model, units, [2, 4, 8], calibration[:4], quantize=rtn_quantize("per_channel"),
                                pair_bits=[2, 4])
    sizes = {u: model.get_submodule(u).weight.numel() for u in units}
    _, best = allocate_bits_pairwise(terms.single, terms.pair, sizes, 4.0 * sum(sizes.values()),
                                     method="exhaustive")
    assert q.meta["metrics"]["predicted_loss_increase"] == pytest.approx(best, abs=1e-9)
    # dropping the cross terms gives a configuration no better under the full model
    diag = iq(targets=targets, diagonal="measured", pair_sequences=4, interactions=False).quantize(model, calibration)
    full = allocation_cost(diag.meta["allocation"], terms.single, terms.pair)
    assert best <= full + 1e-12


def test_group_units_share_bits(model, calibration):
    q = iq(units="group", average_bits=3.0, interactions=False, diagonal="hessian").quantize(model, calibration)
    units = q.meta["units"]
    assert len(units) == 8  # (qkv, o, gate+up, down) x 2 blocks
    qkv = "model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj"
    assert units[qkv] == qkv.split("+")
    for members in units.values():
        assert len({q.meta["allocation"][m] for m in members}) == 1
    assert "loss_evaluations" not in q.meta["metrics"]  # hessian diagonal, no cross terms: nothing measured


def test_loss_bound_meets_bound_with_smallest_found_size(model, calibration):
    tokens = calibration[:8]
    base = loss_fn(model, tokens)
    loose = iq(mode="loss_bound", max_loss_increase=0.5, loss_sequences=8).quantize(model, calibration)
    q = iq(mode="loss_bound", max_loss_increase=0.002, loss_sequences=8).quantize(model, calibration)
    for res, bound in ((loose, 0.5), (q, 0.002)):
        assert loss_fn(loaded(model, res), tokens) - base <= bound + 1e-6
        assert res.meta["metrics"]["loss_bound_loss_increase"] <= bound
    assert loose.meta["bits"] <= q.meta["bits"]
    assert loose.meta["bits"] == 2.0  # nano is random: even all-2-bit stays within 0.5 nats


def test_bad_params(model, calibration):
    with pytest.raises(QuantizationError, match="needs max_loss_increase"):
        iq(mode="loss_bound").quantize(model, calibration)
    with pytest.raises(ValidationError, match="max_loss_increase"):
        InterlayerHessianQuantizer.Params(mode="loss_bound", max_loss_increase=-1.0)
    with pytest.raises(ValidationError, match=r"unsupported bits \[9\]"):
        InterlayerHessianQuantizer.Params(bits_options=[9])
    with pytest.raises(QuantizationError, match=r"bits=1\b"):
        iq(pair_bits=[1]).quantize(model, calibration)
    with pytest.raises(QuantizationError, match=r"average_bits=1\.0 is below"):
        iq(average_bits=1.0).quantize(model, calibration)
    defaults = InterlayerHessianQuantizer.Params().model_dump()
    with pytest.raises(QuantizationError, match=r"bits_options=\[\] is empty"):
        InterlayerHessianQuantizer(InterlayerHessianQuantizer.Params.model_construct(
            **{**defaults, "bits_options": []})).quantize(model, calibration)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        iq().quantize(model, None)


def test_unit_sizes_add_up(model, calibration):
    q = iq(units="group", average_bits=4.0).quantize(model, calibration)
    sizes = {m: s[0] * s[1] for m, s in ((k[:-len(".weight")], v) for k, v in q.meta["shapes"].items())}
    unit_alloc = {u: q.meta["allocation"][ms[0]] for u, ms in q.meta["units"].items()}
    unit_sizes = {u: sum(sizes[m] for m in ms) for u, ms in q.meta["units"].items()}
    assert allocation_size(unit_alloc, unit_sizes) <= 4.0 * sum(sizes.values())
