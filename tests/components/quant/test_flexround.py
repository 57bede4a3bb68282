import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from components.model.presets import build_model
from components.quant.base import QuantizationError, dequantize_packed
from components.quant.flexround import FlexRoundQuantizer, FlexRoundWeight, lp_grid_search
from components.quant.reconstruction import IntGrid, linear_output_errors
from components.quant.registry import QUANTIZERS
from components.quant.rtn import RtnQuantizer, quantize_tensor


def nano(seed=0):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (32, 32), generator=g), torch.randint(0, 64, (16, 32), generator=g)


def flexround(**params):
    return FlexRoundQuantizer(FlexRoundQuantizer.Params(**{"iters": 80, **params}))


def test_registry_entry():
    assert QUANTIZERS.get("flexround") is FlexRoundQuantizer
    assert FlexRoundQuantizer.paper.arxiv == "2306.00317" and FlexRoundQuantizer.needs_calibration


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_search_never_worse_than_rtn_and_better_on_heavy_tails(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 256, generator=g) * 0.02
    w[0, 0] = 0.5  # an outlier: min-max wastes the grid on it
    for granularity in ("per_tensor", "per_channel"):
        grid = IntGrid(4, granularity, 128, symmetric)
        step, zero = lp_grid_search(w, grid)
        codes, scales, zeros, dequant = grid.quantize(w, step, zero)
        rtn = quantize_tensor(w, 4, granularity, 128, symmetric)[3]
        err = (w - dequant).abs().pow(2.4).sum()
        assert err <= (w - rtn).abs().pow(2.4).sum() * (1 + 1e-3)
        if granularity == "per_tensor":
            assert err < 0.8 * (w - rtn).abs().pow(2.4).sum()


def test_init_is_grid_rounding_and_gradients_reach_every_scale():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)) * 0.05
    grid = IntGrid(3, "per_channel", 128, True)
    q = FlexRoundWeight(w, grid, column_scale=True)
    codes, scales, zeros, dequant = q.finalize()
    step = scales.float()
    assert torch.allclose(torch.exp(q.log_s1.detach()), step)
    assert torch.equal(dequant, torch.clamp(torch.round(w / step), -3, 3) * step)
    assert torch.allclose(q.fake_weight(), dequant)
    (q.fake_weight() * torch.randn(16, 32)).sum().backward()
    for t in (q.log_s1, q.log_S2, q.log_s3, q.log_s4):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert q.log_S2.shape == (16, 32) and q.log_s3.shape == (16, 1) and q.log_s4.shape == (1, 32)


def test_larger_divisor_rounds_down():
    """Element-wise division: growing S2 at one weight moves it to a smaller code."""
    w = torch.full((2, 4), 0.29)
    q = FlexRoundWeight(w, IntGrid(4, "per_tensor", 128, True), n_grid=1)  # s1 = 0.29/7
    with torch.no_grad():
        q.log_S2[0, 0] = 0.2
    codes = q.finalize()[0]
    assert int(codes[0, 0]) == 8 + 6 and int(codes[1, 1]) == 8 + 7


@pytest.mark.parametrize("bits, granularity", [(4, "per_tensor"), (3, "per_channel")])
def test_every_block_improves_and_every_layer_beats_rtn(bits, granularity):
    model = nano()
    cal, held = data()
    rtn = RtnQuantizer(RtnQuantizer.Params(bits=bits, granularity=granularity)).quantize(model)
    names = rtn.meta["quantized_tensors"]
    q = flexround(bits=bits, granularity=granularity).quantize(model, cal)
    metrics = q.meta["metrics"]
    for unit in ("blocks.0", "blocks.1"):
        assert metrics[f"{unit}/loss_after"] < metrics[f"{unit}/loss_before"], unit
    base = linear_output_errors(model, {n: rtn.state_dict[n] for n in names}, held)
    errors = linear_output_errors(model, {n: q.state_dict[n] for n in names}, held)
    for n in names:
        assert errors[n] <= base[n], n
    with torch.no_grad():
        reference = model(input_ids=held).logits
        mse = {}
        for key, state in (("rtn", rtn.state_dict), ("flexround", q.state_dict)):
            m = LlamaForCausalLM(model.config)
            m.load_state_dict(state)
            mse[key] = float((m(input_ids=held).logits - reference).pow(2).mean())
    assert mse["flexround"] < mse["rtn"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_on_grid_and_packed_round_trip(symmetric):
    model = nano()
    cal, _ = data()
    q = flexround(bits=4, granularity="group", group_size=32, symmetric=symmetric, iters=10,
                  column_scale=True).quantize(model, cal)
    for name in q.meta["quantized_tensors"]:
        shape = tuple(q.meta["shapes"][name])
        assert q.packed[f"{name}.scales"].shape == (shape[0], shape[1] // 32)
        assert (f"{name}.zeros" in q.packed) != symmetric
        rebuilt = dequantize_packed(q.packed, name, shape, bits=4, zero_point=q.meta["zero_point"])
        assert torch.equal(rebuilt, q.state_dict[name])
    assert q.meta["scheme"] == "flexround" and q.meta["symmetric"] == symmetric


def test_window_mode_runs():
    model = nano()
    cal, _ = data()
    q = flexround(mode="window", window=2, overlap=0, iters=20).quantize(model, cal)
    assert q.meta["metrics"]["blocks.0-1/loss_after"] < q.meta["metrics"]["blocks.0-1/loss_before"]


def test_bad_input():
    model = nano()
    cal, _ = data()
    with pytest.raises(ValidationError, match="bits"):
        FlexRoundQuantizer.Params(bits=5)
    unchecked = FlexRoundQuantizer(FlexRoundQuantizer.Params.model_construct(
        **{**FlexRoundQuantizer.Params().model_dump(), "bits": 5}))
    with pytest.raises(QuantizationError, match=r"bits=5; supported bits: \[2, 3, 4, 8\]"):
        unchecked.quantize(model, cal)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        flexround().quantize(model, None)
    with pytest.raises(QuantizationError, match=r"0 sequences x 32 tokens"):
        flexround().quantize(model, cal[:0])
    with pytest.raises(QuantizationError, match=r"group_size=48 does not divide its input width 64"):
        flexround(granularity="group", group_size=48).quantize(model, cal)
