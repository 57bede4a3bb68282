import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from components.model.presets import build_model
from components.quant.adaround import AdaRoundQuantizer, AdaRoundWeight, rectified_sigmoid
from components.quant.base import QUANT_CONFIG_ATTR, QuantizationError, dequantize_packed
from components.quant.reconstruction import IntGrid, ReconstructionConfig, linear_output_errors, reconstruct
from components.quant.registry import QUANTIZERS
from components.quant.rtn import RtnQuantizer, quantize_tensor


def nano(seed=0):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (32, 32), generator=g), torch.randint(0, 64, (16, 32), generator=g)


def adaround(**params):
    return AdaRoundQuantizer(AdaRoundQuantizer.Params(**{"iters": 100, **params}))


def test_registry_entry():
    assert QUANTIZERS.get("adaround") is AdaRoundQuantizer
    assert AdaRoundQuantizer.paper.arxiv == "2004.10568" and AdaRoundQuantizer.needs_calibration


@pytest.mark.parametrize("granularity, symmetric", [("per_tensor", True), ("per_channel", False), ("group", True)])
def test_init_soft_weight_is_w_and_hard_weight_is_rtn(granularity, symmetric):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 0.05
    grid = IntGrid(4, granularity, 8, symmetric)
    q = AdaRoundWeight(w, grid, iters=10)
    frac = grid.view(w) / q.step - q.floor
    assert torch.allclose(q.h(), frac.clamp(min=0), atol=1e-6)  # h(V0) = fractional part
    low, high = grid.code_range
    soft_code = grid.view(w) / q.step + q.zero.unsqueeze(-1)
    inside = ((soft_code >= low) & (soft_code <= high)).reshape(w.shape)  # asymmetric: min may lie just below
    assert inside.float().mean() > 0.9
    assert torch.allclose(q.fake_weight()[inside], w[inside], atol=1e-6)  # the soft weight is W itself
    codes, scales, zeros, dequant = q.finalize()
    r_codes, r_scales, r_zeros, r_dequant = quantize_tensor(w, 4, granularity, 8, symmetric)
    assert torch.equal(scales, r_scales) and torch.equal(dequant, r_dequant) and torch.equal(codes, r_codes)
    assert (zeros is None) == symmetric


def test_beta_schedule_and_regularizer():
    q = AdaRoundWeight(torch.randn(4, 8), IntGrid(4, "per_channel", 8, True), iters=100)
    assert q.beta(0) is None and q.beta(19) is None and q.regularization(10) == 0.0
    betas = [q.beta(t) for t in range(20, 100)]
    assert betas[0] == pytest.approx(20.0) and betas[-1] == pytest.approx(2.0, abs=0.01)
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    with torch.no_grad():
        q.V.fill_(10.0)  # h = 1 everywhere: the regulariser vanishes
    assert float(q.regularization(50).detach()) == 0.0
    with torch.no_grad():
        q.V.fill_(0.0)  # h = 0.5: each weight costs λ
    assert float(q.regularization(50).detach()) == pytest.approx(0.01 * 32)
    assert rectified_sigmoid(torch.tensor([-100.0, 100.0])).tolist() == [0.0, 1.0]


def test_h_is_binary_after_annealing_and_every_unit_improves():
    model = nano()
    cal, _ = data()
    grid = IntGrid(4, "per_tensor", 128, True)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    result = reconstruct(model, cal, lambda n, l: AdaRoundWeight(l.weight, grid, 200),
                         ReconstructionConfig(mode="layer", iters=200, lr=5e-2, progress=False), targets)
    for name, q in result.quants.items():
        h = q.h().detach()
        soft = ((h > 0.01) & (h < 0.99)).float().mean().item()
        assert soft < 0.02, (name, soft)
        # the finalised rounding is the one h chose
        assert torch.equal(result.weights[f"{name}.weight"][3], q._weight((h >= 0.5).float()))
        # and some weights did not round to nearest
        nearest = quantize_tensor(model.get_submodule(name).weight.detach(), 4, "per_tensor", 128, True)[0]
        assert not torch.equal(result.weights[f"{name}.weight"][0], nearest)
    for unit, m in result.metrics.items():
        assert m["loss_after"] < m["loss_before"], unit


def test_a_diverging_lr_warns_that_the_reconstruction_got_worse(caplog):
    """AdaRound with lr=1e30 used to finish with a 30x worse reconstruction loss and no word."""
    model = nano()
    cal, _ = data()
    with caplog.at_level("WARNING", logger="paperdag.quant"):
        q = adaround(lr=1e30, iters=20).quantize(model, cal)
    worse = [u for u in q.meta["metrics"] if u.endswith("/loss_after")
             and not q.meta["metrics"][u] <= q.meta["metrics"][u.replace("after", "before")] * 1.01]
    assert worse, "lr=1e30 should make at least one unit worse"
    assert "rose from" in caplog.text and "lower the lr" in caplog.text
    assert caplog.text.count("rose from") == len(worse)
    caplog.clear()
    with caplog.at_level("WARNING", logger="paperdag.quant"):
        adaround(iters=50).quantize(model, cal)  # a sane lr: nothing to report
    assert "rose from" not in caplog.text


@pytest.mark.parametrize("bits, granularity", [(4, "per_tensor"), (3, "per_channel")])
def test_beats_rtn_on_held_out_data(bits, granularity):
    model = nano()
    cal, held = data()
    rtn = RtnQuantizer(RtnQuantizer.Params(bits=bits, granularity=granularity)).quantize(model)
    names = rtn.meta["quantized_tensors"]
    base = linear_output_errors(model, {n: rtn.state_dict[n] for n in names}, held)
    # with fp inputs the unit objective is exactly each layer's output error: every layer beats RTN
    q = adaround(bits=bits, granularity=granularity, input_stream="fp").quantize(model, cal)
    errors = linear_output_errors(model, {n: q.state_dict[n] for n in names}, held)
    for n in names:
        assert errors[n] <= base[n], n
    # the paper's setting (quantized inputs) compensates upstream error: the model output beats RTN
    q = adaround(bits=bits, granularity=granularity).quantize(model, cal)
    assert all(q.meta["metrics"][f"{n[:-7]}/loss_after"] < q.meta["metrics"][f"{n[:-7]}/loss_before"]
               for n in names)
    with torch.no_grad():
        reference = model(input_ids=held).logits
        mse = {}
        for key, state in (("rtn", rtn.state_dict), ("adaround", q.state_dict)):
            m = LlamaForCausalLM(model.config)
            m.load_state_dict(state)
            mse[key] = float((m(input_ids=held).logits - reference).pow(2).mean())
    assert mse["adaround"] < mse["rtn"]


def test_packed_round_trip_and_loading():
    model = nano()
    cal, _ = data()
    q = adaround(bits=3, granularity="group", group_size=16, symmetric=False, iters=20).quantize(model, cal)
    assert set(q.state_dict) == set(model.state_dict())
    for name in q.meta["quantized_tensors"]:
        shape = tuple(q.meta["shapes"][name])
        assert q.packed[f"{name}.scales"].dtype == torch.float16
        assert q.packed[f"{name}.zeros"].dtype == torch.uint8
        assert torch.equal(dequantize_packed(q.packed, name, shape, bits=3), q.state_dict[name])
    assert q.meta["scheme"] == "adaround" and q.meta["bits"] == 3 and q.meta["group_size"] == 16
    assert q.meta["metrics"]["reconstruction_loss_after"] < q.meta["metrics"]["reconstruction_loss_before"]
    fresh = q.load_into(LlamaForCausalLM(model.config))
    assert getattr(fresh.config, QUANT_CONFIG_ATTR)["bits"] == 3
    with pytest.raises(QuantizationError, match="already quantized"):
        adaround().quantize(fresh, cal)


def test_bad_input():
    model = nano()
    cal, _ = data()
    with pytest.raises(ValidationError, match="bits"):
        AdaRoundQuantizer.Params(bits=5)
    unchecked = AdaRoundQuantizer(AdaRoundQuantizer.Params.model_construct(
        **{**AdaRoundQuantizer.Params().model_dump(), "bits": 5}))
    with pytest.raises(QuantizationError, match=r"bits=5; supported bits: \[2, 3, 4, 8\]"):
        unchecked.quantize(model, cal)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        adaround().quantize(model, None)
    with pytest.raises(QuantizationError, match=r"0 sequences x 32 tokens"):
        adaround().quantize(model, cal[:0])
    with pytest.raises(QuantizationError, match=r"group_size=128 does not divide its input width 64"):
        adaround(granularity="group", group_size=128).quantize(model, cal)
