import pytest
import torch
from pydantic import ValidationError

from components.quant.base import QuantizationError, dequantize_packed
from components.quant.cbq import CbqQuantizer, LoraRoundingWeight, mse_kl_loss
from components.quant.reconstruction import IntGrid
from components.quant.registry import QUANTIZERS
from components.quant.rtn import quantize_tensor
from tests.components.quant.strided_task import model_from, nano, strided, trained_state


@pytest.fixture(scope="module")
def trained():
    return trained_state()


def cbq(**params):
    return CbqQuantizer(CbqQuantizer.Params(**{"iters": 60, "calibration_sequences": 16, **params}))


def final_hidden_mse(state, result, tokens):
    """Squared error of the last decoder output (summed over features, mean over tokens)."""
    fp, q = model_from(state), model_from(state)
    result.load_into(q)
    with torch.no_grad():
        a = fp.model(input_ids=tokens).last_hidden_state
        b = q.model(input_ids=tokens).last_hidden_state
    return float((a - b).pow(2).sum(-1).mean())


def test_registry_entry():
    assert QUANTIZERS.get("cbq") is CbqQuantizer
    assert CbqQuantizer.paper.arxiv == "2312.07950" and CbqQuantizer.needs_calibration
    p = CbqQuantizer.Params()
    assert (p.mode, p.window, p.overlap, p.loss) == ("window", 2, 1, "mse+kl")


@pytest.mark.parametrize("granularity, symmetric", [("per_channel", False), ("group", True)])
def test_lora_rounding_starts_at_w_and_rtn(granularity, symmetric):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 0.05
    grid = IntGrid(3, granularity, 8, symmetric)
    q = LoraRoundingWeight(w, grid, rank=2, iters=10, generator=torch.Generator().manual_seed(0), lr=1e-3,
                           step_lr=1e-3, step_init="minmax")
    codes, scales, zeros, dequant = q.finalize()
    # V0 + A1 A2 with A2 = 0: h = the fractional part, so the soft weight is W (inside the grid's range)
    step = grid.expand(scales.float(), w.shape)
    zero = grid.expand(q.zero, w.shape)
    low, high = grid.code_range
    assert torch.allclose(q.fake_weight(), torch.clamp(w, (low - zero) * step, (high - zero) * step), atol=1e-6)
    r_codes, r_scales, _, r_dequant = quantize_tensor(w, 3, granularity, 8, symmetric)
    assert torch.equal(scales, r_scales) and torch.equal(codes, r_codes) and torch.equal(dequant, r_dequant)
    assert q.learnable_count() == ((16 + 32) * 2, scales.numel())
    full = LoraRoundingWeight(w, grid, rank=0, iters=10, generator=torch.Generator(), lr=1e-3, step_lr=1e-3)
    assert full.learnable_count()[0] == 16 * 32
    literal = LoraRoundingWeight(w, grid, rank=2, iters=10, generator=torch.Generator(), lr=1e-3, step_lr=1e-3,
                                 lora_base="none")
    assert torch.allclose(literal.h(), torch.full_like(literal.h(), 0.5))  # V = A1 A2 = 0


def test_kl_loss():
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(2, 5, 8, generator=g)
    loss = mse_kl_loss(1.0)
    assert float(loss(fp, fp)) == pytest.approx(0.0, abs=1e-6)
    q = fp + 0.3 * torch.randn(2, 5, 8, generator=g)
    mse = float((q - fp).pow(2).sum(-1).mean())
    assert float(loss(q, fp)) > mse > 0
    assert float(mse_kl_loss(0.0)(q, fp)) == pytest.approx(mse, rel=1e-6)


def test_cross_block_windows_leave_less_error_than_rtn(trained):
    """Window mode (2 blocks, overlap 1) optimises every block and ends below RTN's error at the
    last block. Whether windows beat single blocks is the paper's claim, measured by the `cbq`
    recipe rather than asserted here: on these tiny models the two are within a few percent."""
    cal = strided(16, 1)
    result = cbq(bits=3, mode="window").quantize(model_from(trained), cal)
    rtn = QUANTIZERS.get("rtn")
    baseline = rtn(rtn.Params(bits=3, granularity="per_channel", symmetric=False)).quantize(model_from(trained))
    assert final_hidden_mse(trained, result, cal) < final_hidden_mse(trained, baseline, cal)
    assert any(k.endswith("loss_after") for k in result.meta["metrics"])


def test_lora_rounding_close_to_full_rank_with_far_fewer_parameters(trained):
    cal = strided(16, 2)
    lora = cbq(bits=3, rank=4, mode="block").quantize(model_from(trained), cal)
    full = cbq(bits=3, rank=0, lr=5e-2, mode="block").quantize(model_from(trained), cal)
    counts_lora, counts_full = lora.meta["learnable_parameters"], full.meta["learnable_parameters"]
    assert counts_full["rounding"] == counts_full["adaround_equivalent"]
    assert counts_lora["rounding"] * 5 < counts_full["rounding"]
    err_lora = final_hidden_mse(trained, lora, cal)
    err_full = final_hidden_mse(trained, full, cal)
    assert err_lora < 3 * err_full, (err_lora, err_full)
    for result in (lora, full):  # learning helps over the starting grid
        m = result.meta["metrics"]
        assert m["reconstruction_loss_after"] < m["reconstruction_loss_before"]


def test_output_is_packed_on_the_3_bit_grid_and_leaves_the_input_model_alone(trained):
    cal = strided(8, 3)
    model = model_from(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantizer = cbq(bits=3, iters=20, activations={"bits": 8})
    result = quantizer.with_activations(quantizer.quantize(model, cal))  # as the quantize stage does
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.meta["activations"]["bits"] == 8
    for name in result.meta["quantized_tensors"]:
        shape = tuple(before[name].shape)
        q = dequantize_packed(result.packed, name, shape, 3)
        assert torch.equal(q, result.state_dict[name])
        assert f"{name}.zeros" in result.packed  # asymmetric by default


def test_validation():
    with pytest.raises(ValidationError, match=r"bits\n  Input should be 2, 3, 4 or 8"):
        CbqQuantizer.Params(bits=5)
    with pytest.raises(ValidationError, match=r"mode\n  Input should be 'block' or 'window'"):
        CbqQuantizer.Params(mode="layer")
    with pytest.raises(QuantizationError, match="overlap"):
        cbq(window=2, overlap=2).quantize(nano(), strided(4, 0))
    with pytest.raises(QuantizationError, match="calibration"):
        cbq().quantize(nano(), None)
