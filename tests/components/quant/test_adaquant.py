import itertools

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from components.model.presets import build_model
from components.quant.adaquant import AdaQuantQuantizer, AdaQuantWeight, allocate_bits_ilp, lm_loss
from components.quant.base import QuantizationError, dequantize_packed
from components.quant.packing import unpack_int
from components.quant.reconstruction import IntGrid, linear_output_errors
from components.quant.registry import QUANTIZERS
from components.quant.rtn import RtnQuantizer, quantize_tensor


def nano(seed=0):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (32, 32), generator=g), torch.randint(0, 64, (16, 32), generator=g)


def adaquant(**params):
    return AdaQuantQuantizer(AdaQuantQuantizer.Params(**{"iters": 100, **params}))


def test_registry_entry():
    assert QUANTIZERS.get("adaquant") is AdaQuantQuantizer
    assert AdaQuantQuantizer.paper.arxiv == "2006.10518" and AdaQuantQuantizer.needs_calibration


# --------------------------------------------------------------------------- integer program


def brute_force(costs, sizes, budget):
    names = list(costs)
    best = None
    for choice in itertools.product(*(sorted(costs[n]) for n in names)):
        if sum(sizes[n] * b for n, b in zip(names, choice)) <= budget:
            total = sum(costs[n][b] for n, b in zip(names, choice))
            if best is None or total < best[0]:
                best = (total, dict(zip(names, choice)))
    return best


def test_ilp_finds_the_known_optimum_and_beats_uniform():
    # "attn" is very sensitive below 8 bits, "mlp" barely cares, "head" is in between: under a 4-bit
    # average, the optimum spends bits on attn and starves mlp, which uniform 4-bit cannot.
    costs = {"attn": {2: 9.0, 4: 3.0, 8: 0.0}, "mlp": {2: 0.2, 4: 0.1, 8: 0.0}, "head": {2: 2.0, 4: 0.5, 8: 0.0}}
    sizes = {"attn": 100, "mlp": 200, "head": 100}
    budget = 4 * 400
    allocation = allocate_bits_ilp(costs, sizes, budget)
    assert allocation == {"attn": 8, "mlp": 2, "head": 4}
    total = sum(costs[n][b] for n, b in allocation.items())
    assert sum(sizes[n] * b for n, b in allocation.items()) <= budget
    assert total == brute_force(costs, sizes, budget)[0] == pytest.approx(0.7)
    assert total < sum(costs[n][4] for n in costs)  # uniform 4-bit: 3.6


@pytest.mark.parametrize("seed", range(5))
def test_ilp_matches_brute_force_on_random_instances(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(5)]
    costs = {n: dict(zip((2, 3, 4, 8), sorted(torch.rand(4, generator=g).tolist(), reverse=True))) for n in names}
    sizes = {n: int(s) for n, s in zip(names, torch.randint(10, 100, (5,), generator=g))}
    budget = 3.5 * sum(sizes.values())
    allocation = allocate_bits_ilp(costs, sizes, budget)
    assert sum(sizes[n] * b for n, b in allocation.items()) <= budget
    assert sum(costs[n][b] for n, b in allocation.items()) == pytest.approx(brute_force(costs, sizes, budget)[0])


def test_ilp_infeasible_budget():
    with pytest.raises(QuantizationError, match=r"budget of 150 bits is below the smallest possible size 200"):
        allocate_bits_ilp({"a": {2: 1.0, 4: 0.0}}, {"a": 100}, 150)


# --------------------------------------------------------------------------- the learnable weight


def test_step_gets_the_lsq_gradient():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    grid = IntGrid(4, "per_channel", 128, True)
    q = AdaQuantWeight(w, grid)
    q.fake_weight().sum().backward()
    s = q.step0.squeeze(-1)
    v = w / s.unsqueeze(-1)
    lsq = torch.where(v.abs() <= 7, torch.round(v) - v, torch.sign(v) * 7).sum(-1)  # d(sum Q)/ds
    assert torch.allclose(q.log_step.grad.squeeze(-1), lsq * s, atol=1e-5)  # chain rule through log
    assert torch.allclose(q.delta.grad, s.unsqueeze(-1).expand(4, 64))      # STE: dQ/dΔ = step0


def test_init_is_rtn():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    for symmetric in (True, False):
        codes, scales, zeros, dequant = AdaQuantWeight(w, IntGrid(3, "group", 16, symmetric)).finalize()
        r = quantize_tensor(w, 3, "group", 16, symmetric)
        assert torch.equal(codes, r[0]) and torch.equal(scales, r[1]) and torch.equal(dequant, r[3])


# --------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("bits, granularity", [(4, "per_tensor"), (3, "per_channel")])
def test_every_layer_improves_and_beats_rtn(bits, granularity):
    model = nano()
    cal, held = data()
    rtn = RtnQuantizer(RtnQuantizer.Params(bits=bits, granularity=granularity)).quantize(model)
    names = rtn.meta["quantized_tensors"]
    base = linear_output_errors(model, {n: rtn.state_dict[n] for n in names}, held)
    # parallel AdaQuant: each layer's objective is its own output error, so each beats RTN
    q = adaquant(bits=bits, granularity=granularity, input_stream="fp").quantize(model, cal)
    errors = linear_output_errors(model, {n: q.state_dict[n] for n in names}, held)
    for n in names:
        assert errors[n] <= base[n], n
    # sequential (default): every layer's calibration loss drops and the model output beats RTN
    q = adaquant(bits=bits, granularity=granularity).quantize(model, cal)
    for n in names:
        assert q.meta["metrics"][f"{n[:-7]}/loss_after"] < q.meta["metrics"][f"{n[:-7]}/loss_before"], n
    with torch.no_grad():
        reference = model(input_ids=held).logits
        mse = {}
        for key, state in (("rtn", rtn.state_dict), ("adaquant", q.state_dict)):
            m = LlamaForCausalLM(model.config)
            m.load_state_dict(state)
            mse[key] = float((m(input_ids=held).logits - reference).pow(2).mean())
    assert mse["adaquant"] < mse["rtn"]


def test_asymmetric_codes_on_grid():
    model = nano()
    cal, _ = data()
    q = adaquant(bits=3, granularity="per_channel", symmetric=False, iters=20).quantize(model, cal)
    for name in q.meta["quantized_tensors"]:
        shape = tuple(q.meta["shapes"][name])
        assert q.packed[f"{name}.zeros"].dtype == torch.uint8 and int(q.packed[f"{name}.zeros"].max()) <= 7
        assert torch.equal(dequantize_packed(q.packed, name, shape, bits=3), q.state_dict[name])


def test_bit_budget_allocates_mixed_precision_within_budget():
    model = nano()
    cal, _ = data()
    q = adaquant(bit_budget=4.0, candidate_bits=[2, 4, 8], iters=10, sensitivity_sequences=8).quantize(model, cal)
    allocation = q.meta["bit_allocation"]
    tensors = q.meta["tensors"]
    sizes = {n: t["shape"][0] * t["shape"][1] for n, t in tensors.items()}
    assert q.meta["bits"] is None and q.meta["bit_budget"] == 4.0
    assert sum(sizes[n] * t["bits"] for n, t in tensors.items()) <= 4.0 * sum(sizes.values())
    assert len({t["bits"] for t in tensors.values()}) > 1  # not uniform
    for name, t in tensors.items():
        module = name[:-7]
        assert t["bits"] == allocation[module] and q.meta["metrics"][f"{module}/bits"] == t["bits"]
        shape = tuple(t["shape"])
        codes = unpack_int(q.packed[f"{name}.qweight"], t["bits"], sizes[name])
        assert int(codes.max()) < 2 ** t["bits"]
        rebuilt = dequantize_packed(q.packed, name, shape, bits=t["bits"], zero_point=t["zero_point"])
        assert torch.equal(rebuilt, q.state_dict[name])
    # the allocation is optimal for the measured increases
    costs = {n: {int(b): c for b, c in cs.items()} for n, cs in q.meta["loss_increase"].items()}
    chosen = sum(costs[n][b] for n, b in allocation.items())
    assert chosen == pytest.approx(optimum_by_dp(costs, {n[:-7]: s for n, s in sizes.items()},
                                                           4.0 * sum(sizes.values())), abs=1e-9)
    assert chosen <= sum(costs[n][4] for n in costs) + 1e-12


def optimum_by_dp(costs, sizes, budget):
    """Exact optimum by dynamic programming over total size (sizes here are multiples of 64*64 // 4)."""
    unit = 1024
    assert all(s % unit == 0 for s in sizes.values())
    best = {0: 0.0}
    for n in costs:
        step = {}
        for used, total in best.items():
            for b, c in costs[n].items():
                u = used + sizes[n] * b // unit
                if u * unit <= budget and total + c < step.get(u, float("inf")):
                    step[u] = total + c
        best = step
    return min(best.values())


def test_lm_loss_does_not_touch_the_model():
    model = nano()
    cal, _ = data()
    before = lm_loss(model, cal)
    name = "model.layers.0.mlp.down_proj.weight"
    worse = lm_loss(model, cal, {name: torch.zeros_like(model.state_dict()[name])})
    assert worse != before and lm_loss(model, cal) == before


def test_bad_input():
    model = nano()
    cal, _ = data()
    with pytest.raises(ValidationError, match="bits"):
        AdaQuantQuantizer.Params(bits=5)
    with pytest.raises(ValidationError, match="candidate_bits"):
        AdaQuantQuantizer.Params(candidate_bits=[2, 5])
    unchecked = AdaQuantQuantizer(AdaQuantQuantizer.Params.model_construct(
        **{**AdaQuantQuantizer.Params().model_dump(), "bits": 5}))
    with pytest.raises(QuantizationError, match=r"bits=5; supported bits: \[2, 3, 4, 8\]"):
        unchecked.quantize(model, cal)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        adaquant().quantize(model, None)
    with pytest.raises(QuantizationError, match=r"0 sequences x 32 tokens"):
        adaquant().quantize(model, cal[:0])
    with pytest.raises(QuantizationError, match=r"group_size=100 does not divide its input width 64"):
        adaquant(granularity="group", group_size=100).quantize(model, cal)
    with pytest.raises(QuantizationError, match=r"bit_budget=1.0 is below the smallest candidate width 2"):
        adaquant(bit_budget=1.0, candidate_bits=[2, 4], iters=1, sensitivity_sequences=2).quantize(model, cal)
