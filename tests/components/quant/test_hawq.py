import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from components.model.presets import build_model
from components.quant.base import QUANT_CONFIG_ATTR, QuantizationError, dequantize_packed
from components.quant.hawq import HawqQuantizer
from components.quant.hawq_v2 import HawqV2Quantizer, reverse_ranking
from components.quant.registry import QUANTIZERS
from components.quant.sensitivity import quantization_errors, rtn_quantize
from tests.components.quant.test_adaquant import optimum_by_dp


@pytest.fixture(scope="module")
def model():
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=0)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))


def v2(**params):
    params.setdefault("hutchinson_samples", 12)
    return HawqV2Quantizer(HawqV2Quantizer.Params(**params))


def v1(**params):
    params.setdefault("power_iters", 8)
    return HawqQuantizer(HawqQuantizer.Params(**params))


@pytest.fixture(scope="module")
def v2_result(model, calibration):
    return v2().quantize(model, calibration)


def test_registry_entries():
    assert QUANTIZERS.get("hawq") is HawqQuantizer and HawqQuantizer.paper.arxiv == "1905.03696"
    assert QUANTIZERS.get("hawq_v2") is HawqV2Quantizer and HawqV2Quantizer.paper.arxiv == "1911.03852"
    assert HawqQuantizer.needs_calibration and HawqV2Quantizer.needs_calibration


def test_v2_packed_format_and_meta(model, v2_result):
    q = v2_result
    alloc = q.meta["allocation"]
    assert len(alloc) == 14 and set(alloc.values()) <= {2, 4, 8}
    sizes = {name: 1 for name in alloc}
    for name in alloc:
        shape = tuple(q.meta["shapes"][f"{name}.weight"])
        sizes[name] = shape[0] * shape[1]
        bits = alloc[name]
        assert q.meta["tensors"][f"{name}.weight"]["bits"] == bits
        assert q.meta["metrics"][f"bits.{name}"] == bits
        rebuilt = dequantize_packed(q.packed, f"{name}.weight", shape, bits, zero_point=2 ** (bits - 1))
        assert torch.equal(rebuilt, q.state_dict[f"{name}.weight"])
        assert f"trace.{name}" in q.meta["metrics"]
    average = sum(sizes[n] * alloc[n] for n in alloc) / sum(sizes.values())
    assert q.meta["bits"] == pytest.approx(average)
    assert average <= 4.0
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(q.state_dict[key], model.state_dict()[key])
    fresh = LlamaForCausalLM(copy.deepcopy(model.config))
    q.load_into(fresh)
    assert getattr(fresh.config, QUANT_CONFIG_ATTR)["bits"] == pytest.approx(average)


def test_v2_allocation_is_the_milp_optimum_of_omega(model, v2_result):
    # the chosen bits minimise Σ Tr/n·||Q_b(W)-W||² among configurations within the budget
    q = v2_result
    sens = q.meta["sensitivity"]
    linears = {n: m for n, m in model.named_modules() if n in sens}
    errors = quantization_errors({n: m.weight for n, m in linears.items()}, [2, 4, 8], rtn_quantize("per_channel"))
    omega = {n: {b: sens[n] * errors[n][b] for b in (2, 4, 8)} for n in sens}
    chosen = sum(omega[n][b] for n, b in q.meta["allocation"].items())
    assert chosen == pytest.approx(q.meta["metrics"]["omega_total"])
    uniform4 = sum(omega[n][4] for n in sens)
    assert chosen <= uniform4 * (1 + 1e-9)
    sizes = {n: m.weight.numel() for n, m in linears.items()}  # the default budget: 4 bits on average
    assert chosen == pytest.approx(optimum_by_dp(omega, sizes, 4 * sum(sizes.values())), rel=1e-9)
    frontier = q.meta["pareto_frontier"]
    assert [p[0] for p in frontier] == sorted(p[0] for p in frontier)
    assert all(a[1] > b[1] for a, b in zip(frontier, frontier[1:]))
    assert any(p[0] == pytest.approx(q.meta["bits"]) and p[1] == pytest.approx(chosen) for p in frontier)


@pytest.mark.parametrize("average_bits", [2.0, 3.0, 5.0, 8.0])
def test_v2_average_bits_within_budget(model, calibration, average_bits):
    q = v2(average_bits=average_bits, hutchinson_samples=3).quantize(model, calibration)
    assert q.meta["bits"] <= average_bits + 1e-9
    if average_bits in (2.0, 8.0):  # only one configuration fits exactly
        assert set(q.meta["allocation"].values()) == {int(average_bits)}


def test_reversed_ranking_is_worse_on_true_sensitivities(model, calibration, v2_result):
    assert reverse_ranking({"a": 1.0, "b": 3.0, "c": 2.0}) == {"a": 3.0, "b": 1.0, "c": 2.0}
    rev = v2(ranking="reversed").quantize(model, calibration)
    sens = v2_result.meta["sensitivity"]
    assert rev.meta["sensitivity"] == reverse_ranking(sens)
    linears = {n: m for n, m in model.named_modules() if n in sens}
    errors = quantization_errors({n: m.weight for n, m in linears.items()}, [2, 4, 8], rtn_quantize("per_channel"))
    true_omega = {alloc_name: sum(sens[n] * errors[n][b] for n, b in res.meta["allocation"].items())
                  for alloc_name, res in (("hessian", v2_result), ("reversed", rev))}
    assert rev.meta["allocation"] != v2_result.meta["allocation"]
    assert true_omega["hessian"] < true_omega["reversed"]


def test_v1_eigenvalues_and_ordering_rule(model, calibration):
    q = v1().quantize(model, calibration)
    sens = q.meta["sensitivity"]
    alloc = q.meta["allocation"]
    assert q.meta["bits"] <= 4.0 + 1e-9
    ranking = sorted(sens, key=lambda n: -sens[n])
    bits = [alloc[n] for n in ranking]
    assert bits == sorted(bits, reverse=True)  # more sensitive (λ/n) layers never get fewer bits
    for n in alloc:
        lam = q.meta["metrics"][f"eigenvalue.{n}"]
        n_params = q.meta["shapes"][f"{n}.weight"][0] * q.meta["shapes"][f"{n}.weight"][1]
        assert sens[n] == pytest.approx(max(lam, 0.0) / n_params)
        assert 1 <= q.meta["metrics"][f"power_iterations.{n}"] <= 8
    milp = v1(allocation="milp").quantize(model, calibration)
    assert milp.meta["metrics"]["omega_total"] <= q.meta["metrics"]["omega_total"] * (1 + 1e-9)


def test_model_is_left_unchanged(calibration):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    v2(hutchinson_samples=2).quantize(model, calibration)
    v1(power_iters=2).quantize(model, calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == attn
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("cls", [HawqQuantizer, HawqV2Quantizer])
def test_bad_params(model, calibration, cls):
    with pytest.raises(ValidationError, match="bits_options"):
        cls.Params(bits_options=[])
    with pytest.raises(ValidationError, match=r"unsupported bits \[1, 9\]"):
        cls.Params(bits_options=[1, 4, 9])
    defaults = cls.Params().model_dump()
    with pytest.raises(QuantizationError, match=r"bits_options=\[\] is empty"):
        cls(cls.Params.model_construct(**{**defaults, "bits_options": []})).quantize(model, calibration)
    with pytest.raises(QuantizationError, match=r"bits=1\b"):
        cls(cls.Params.model_construct(**{**defaults, "bits_options": [1, 4]})).quantize(model, calibration)
    with pytest.raises(QuantizationError, match=r"average_bits=1\.5 is below the smallest possible size 2"):
        cls(cls.Params(average_bits=1.5)).quantize(model, calibration)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        cls().quantize(model, None)


def test_refuses_quantized_model(calibration):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0)
    setattr(model.config, QUANT_CONFIG_ATTR, {"scheme": "rtn", "bits": 4})
    with pytest.raises(QuantizationError, match="already quantized"):
        v2().quantize(model, calibration)
