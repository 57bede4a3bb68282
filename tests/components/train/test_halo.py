"""HALO: Hadamard rotations around low-precision GEMMs. The rotations are exact and undone (an
identity quantizer gives the fp32 gradients at every level), each level cuts the error of the GEMMs
it rotates when operands have outlier channels or tokens, outlier injection keeps the model's
function, and the method trains, folds back to a plain Llama and resumes exactly."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.model.outliers import inject_outlier_channels
from components.quant.hadamard import hadamard_block, rotate
from components.train.halo import HaloTraining, LowPrecisionLinear, _LowPrecisionGemm, gemm_quantizer
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@pytest.mark.parametrize("n, block", [(64, 64), (24, 8), (704, 64), (7, 1), (256, 256), (384, 128)])
def test_rotate_is_the_orthonormal_block_hadamard_and_its_own_inverse(n, block):
    x = torch.randn(5, n, dtype=torch.float64)
    assert hadamard_block(n) == block
    expected = x @ torch.block_diag(*[sylvester(block)] * (n // block))
    assert torch.allclose(rotate(x), expected, atol=1e-12)
    assert torch.allclose(rotate(x.T.contiguous(), 0), expected.T, atol=1e-12)  # along another dim
    assert torch.allclose(rotate(rotate(x)), x, atol=1e-12)


class Operands:
    """The layer side of ``_LowPrecisionGemm``: every operand through one quantizer."""

    backward_reuses_forward = same_output_gradients = True

    def __init__(self, quantize):
        self.quantize = quantize


def gemm_grads(x, w, e, quantize, level):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    if quantize is None:
        y = x @ w.T
    else:
        y = _LowPrecisionGemm.apply(x, w, Operands(quantize), level)
    y.backward(e)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("level", [0, 1, 2])
def test_every_level_undoes_its_rotations(level):
    """With a quantizer that changes nothing, all three GEMMs equal the fp32 ones."""
    g = torch.Generator().manual_seed(0)
    x, w, e = torch.randn(32, 24, generator=g), torch.randn(12, 24, generator=g), torch.randn(32, 12, generator=g)
    exact = gemm_grads(x, w, e, None, level)
    for got, want in zip(gemm_grads(x, w, e, lambda t, what: t, level), exact):
        assert torch.allclose(got, want, atol=1e-5), level


def test_fp8_gemms_round_every_operand_and_stay_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    x, w, e = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(64, 16, generator=g)
    e4m3 = gemm_quantizer("e4m3")
    for got, want in zip(gemm_grads(x, w, e, lambda t, what: e4m3(t), 0), gemm_grads(x, w, e, None, 0)):
        error = float((got - want).norm() / want.norm())
        assert 0.005 < error < 0.08  # 3 mantissa bits: a few percent, and never exact


def relative_errors(level, outlier_tokens, seed=0):
    """Errors of y, dX, dW under int8 GEMMs for operands with 2 outlier channels (64x) in x and,
    if ``outlier_tokens``, 2 outlier tokens (64x) in the output gradient."""
    g = torch.Generator().manual_seed(seed)
    x, w, e = torch.randn(256, 128, generator=g), torch.randn(64, 128, generator=g) / 11, torch.randn(256, 64, generator=g)
    x[:, [3, 77]] *= 64
    w[:, [3, 77]] /= 64  # the function-preserving pair, as inject_outlier_channels makes it
    if outlier_tokens:
        e[[5, 200]] *= 64
    int8 = gemm_quantizer("int8")
    got = gemm_grads(x, w, e, lambda t, what: int8(t), level)
    return [float((a - b).norm() / b.norm()) for a, b in zip(got, gemm_grads(x, w, e, None, level))]


def test_each_level_cuts_the_error_of_the_gemms_it_rotates():
    (y0, dx0, _), (y1, dx1, _), (y2, dx2, _) = (relative_errors(level, outlier_tokens=True) for level in range(3))
    assert y1 < y0 / 3 and y2 == pytest.approx(y1)  # the input-dimension rotation of the forward
    assert dx1 == pytest.approx(dx0)  # level 1 leaves the backward as it is
    assert dx2 < dx0 / 3  # the token rotation of the output gradient
    # the weight gradient quantizes the output gradient unrotated (as HALO does), so its gain from
    # the rotated input shows when the outliers are in the input only
    (_, _, dw0), (_, _, dw1), (_, _, dw2) = (relative_errors(level, outlier_tokens=False) for level in range(3))
    assert dw1 == pytest.approx(dw0) and dw2 < dw0 / 3


def test_outlier_injection_keeps_the_function_and_makes_outlier_inputs():
    model, batch = nano(), torch.from_numpy(pattern_blocks()[:4].astype("int64"))
    captured = {}
    hook = lambda name: lambda module, args: captured.__setitem__(name, args[0].detach())  # noqa: E731
    layer = model.model.layers[0]
    layer.self_attn.q_proj.register_forward_pre_hook(hook("q"))
    with torch.no_grad():
        before, q_before = model(input_ids=batch).logits, None
        q_before = captured["q"].abs().amax(dim=(0, 1))
        channels = inject_outlier_channels(model, 2, 64.0, seed=0)
        after = model(input_ids=batch).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    q_after = captured["q"].abs().amax(dim=(0, 1))
    assert len(channels) == 2 and torch.allclose(q_after[channels], 64 * q_before[channels], rtol=1e-4)
    others = [c for c in range(q_after.numel()) if c not in channels]
    assert q_after[channels].min() > 10 * q_after[others].max()


def halo(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", outlier_channels=2,
                  outlier_scale=16.0)
    params.update(overrides)
    config = HaloTraining.Params(**params)
    return config, HaloTraining(config)


@pytest.mark.parametrize("gemm_format, level", [("int8", 2), ("fp32", 0)])  # e4m3 GEMMs: the forward tests
def test_halo_trains_and_saves_a_plain_llama_of_its_master_weights(gemm_format, level):
    config, method = halo(gemm_format=gemm_format, level=level)
    model, base = nano(), nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5]), gemm_format
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert not any(isinstance(m, LowPrecisionLinear) for m in model.modules())
    # the fp32 master weights, not their fake-quantized copies: far more values than an 8-bit grid has
    for name, weight in model.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert weight.dtype == torch.float32 and weight.unique().numel() > 1024, name
    facts = result.method_facts
    assert facts["low_precision_layers"] == 14 and facts["halo_level"] == level
    assert len(facts["outlier_channels"]) == 2 and facts["outlier_scale"] == 16.0


def test_a_halo_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: halo(steps=12, checkpoint_every=4))


@pytest.mark.parametrize("params, message", [
    (dict(gemm_format="int9"), "gemm_format='int9' is not fp32, int2..int8 or a minifloat"),
    (dict(gemm_format="fp32", level=2), "with gemm_format=fp32 nothing is quantized"),
    (dict(outlier_channels=4), "outlier_channels=4 with outlier_scale=1 changes nothing"),
    (dict(level=3), "less than or equal to 2"),
])
def test_bad_params_are_refused_by_name(params, message):
    with pytest.raises(ValidationError, match=message):
        HaloTraining.Params(**params)


@pytest.mark.parametrize("gemm_format", ["int8", "e4m3"])
def test_a_non_finite_operand_names_its_layer(gemm_format):
    config, method = halo(steps=2, gemm_format=gemm_format)
    model = nano()
    method.prepare(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    batch = torch.from_numpy(pattern_blocks()[:2].astype("int64"))
    with pytest.raises(FloatingPointError, match=rf"model\.layers\.1\.mlp\.down_proj: the weight of a {gemm_format} GEMM "
                                                 "is not finite"):
        model(input_ids=batch)


def test_training_stops_at_the_step_naming_the_layer():
    from components.train.trainer import NonFiniteLossError

    model = nano()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"model\.layers\.0\.self_attn\.o_proj: the weight .* at step 1$"):
        train(model, pattern_blocks(), *halo(steps=3), progress=False)
