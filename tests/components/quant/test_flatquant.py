import math

import pytest
import torch
from pydantic import ValidationError

from components.quant.activation import ActivationSpec, install_activation_quant
from components.quant.base import QuantizationError, dequantize_packed
from components.quant.flatquant import (FlatQuantQuantizer, KroneckerTransform, balanced_factors, cayley,
                                        kron_matmul)
from components.quant.reconstruction import IntGrid
from components.quant.registry import QUANTIZERS
from components.quant.rtn import RtnQuantizer
from tests.components.quant.strided_task import VOCAB, model_from, nano, strided, trained_state


@pytest.fixture(scope="module")
def trained():
    return trained_state()


def flatquant(**params):
    return FlatQuantQuantizer(FlatQuantQuantizer.Params(**{"iters": 40, "calibration_sequences": 16, **params}))


def mean_ce(model, tokens, quantized=None):
    handles = []
    if quantized is not None:
        quantized.load_into(model)
        if quantized.meta.get("activations"):
            handles = install_activation_quant(model, ActivationSpec.from_meta(quantized.meta["activations"]),
                                               quantized.activation_state)
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[:, :-1]
    finally:
        for h in handles:
            h.remove()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()


def identity_hooks(model, names, side_state, bits=None):
    """Pre-hooks ``x -> (x T) T^-1`` from the stored side tensors: with ``bits`` through activation.py's
    hooks (16-bit int rounding in between, no clipping), else with no rounding at all."""
    side = {k: v for k, v in side_state.items() if k.endswith(("act_transform", "act_transform_inv"))}
    if bits is not None:
        return install_activation_quant(model, ActivationSpec(bits=bits, modules=tuple(names)), side)
    modules = dict(model.named_modules())
    return [modules[n].register_forward_pre_hook(
        lambda _m, args, t=side[f"{n}.act_transform"], t_inv=side[f"{n}.act_transform_inv"]: ((args[0] @ t) @ t_inv,))
        for n in names]


def logits_with(model, hooks_fn, tokens):
    handles = hooks_fn(model)
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()


def test_registry_entry():
    assert QUANTIZERS.get("flatquant") is FlatQuantQuantizer
    assert FlatQuantQuantizer.paper.arxiv == "2410.09426" and FlatQuantQuantizer.needs_calibration


def test_kronecker_building_blocks():
    assert balanced_factors(64) == (8, 8) and balanced_factors(192) == (12, 16)
    assert balanced_factors(704) == (22, 32) and balanced_factors(6) == (2, 3) and balanced_factors(13) == (1, 13)
    g = torch.Generator().manual_seed(0)
    left, right, x = torch.randn(3, 3, generator=g), torch.randn(4, 4, generator=g), torch.randn(5, 2, 12, generator=g)
    assert torch.allclose(kron_matmul(x, left, right), x @ torch.kron(left, right), atol=1e-5)
    q = cayley(torch.randn(6, 6, generator=g))
    assert torch.allclose(q @ q.T, torch.eye(6), atol=1e-5)
    for parametrization in ("svd", "inv"):
        t = KroneckerTransform(12, g, parametrization, diag=torch.rand(12, generator=g) + 0.5)
        with torch.no_grad():  # move away from the (orthogonal) start
            for p in t.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            dense, dense_inv = t.dense()
            w = torch.randn(7, 12, generator=g)
            assert torch.allclose(dense @ dense_inv, torch.eye(12), atol=1e-4)
            assert torch.allclose(t.forward(x), x @ dense, atol=1e-4)
            assert torch.allclose(t.inverse(t.forward(x)), x, atol=1e-4)
            assert torch.allclose(t.weight_to(w), w @ dense_inv.T, atol=1e-4)
            assert torch.allclose(t.weight_from(t.weight_to(w)), w, atol=1e-4)


def test_transform_is_an_exact_identity_without_quantization(trained):
    """Untrained (random orthogonal + SmoothQuant-style diag) and learned transforms both give the
    fp model back when nothing is rounded: x T T^-1 and (W T^-T) T^T."""
    tokens = strided(16, 1)
    model = model_from(trained)
    with torch.no_grad():
        reference = model(input_ids=tokens).logits
    q = flatquant()
    quants = q.build(model, tokens, IntGrid(4, "per_channel", 128, True))
    side = {f"{n}.{k}": v for n, qq in quants.items() for k, v in qq.side_tensors().items()}
    work = model_from(trained)
    modules = dict(work.named_modules())
    with torch.no_grad():
        for name, qq in quants.items():
            assert not torch.allclose(side[f"{name}.act_transform"], torch.eye(qq.weight.shape[1]), atol=0.1)
            modules[name].weight.copy_(qq.unquantized_weight())
    assert (logits_with(work, lambda m: identity_hooks(m, quants, side), tokens) - reference).abs().max() < 1e-4
    # through the evaluate stage's hooks at 16 bits: only the 16-bit rounding remains
    out16 = logits_with(work, lambda m: identity_hooks(m, quants, side, bits=16), tokens)
    assert (out16 - reference).abs().max() < 1e-3 * reference.abs().max()

    # the learned transforms of a W4A4 run, from the stored artifacts
    result = q.quantize(model_from(trained), tokens)
    work = model_from(trained)
    modules = dict(work.named_modules())
    names = result.meta["activations"]["modules"]
    with torch.no_grad():
        for name in names:
            t = result.activation_state[f"{name}.act_transform"]
            t_inv = result.activation_state[f"{name}.act_transform_inv"]
            w = modules[name].weight
            w.copy_((w @ t_inv.T) @ t.T)
    out = logits_with(work, lambda m: identity_hooks(m, names, result.activation_state), tokens)
    assert (out - reference).abs().max() < 1e-4


def test_w4a4_training_lowers_block_loss_and_beats_rtn_w4a4(trained):
    cal, held_out = strided(32, 2), strided(32, 3)
    fp = mean_ce(model_from(trained), held_out)
    rtn = RtnQuantizer(RtnQuantizer.Params(bits=4, granularity="per_channel", activations={"bits": 4}))
    model = model_from(trained)
    rtn_result = rtn.with_activations(rtn.quantize(model))
    rtn_ce = mean_ce(model_from(trained), held_out, rtn_result)

    result = flatquant(calibration_sequences=32).quantize(model_from(trained), cal)
    metrics = result.meta["metrics"]
    for block in ("blocks.0", "blocks.1"):  # W4A4 block-output MSE: learned transform < initial one
        assert metrics[f"{block}/loss_after"] < metrics[f"{block}/loss_before"], block
    fq_ce = mean_ce(model_from(trained), held_out, result)
    assert fp < fq_ce < rtn_ce, (fp, fq_ce, rtn_ce)


def test_output_contract_packed_codes_and_activation_spec(trained):
    tokens = strided(16, 4)
    model = model_from(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = flatquant(iters=10, lwc=False).quantize(model, tokens)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    spec = ActivationSpec.from_meta(result.meta["activations"])
    assert spec.bits == 4 and spec.granularity == "per_token" and spec.symmetric
    assert len(spec.modules) == 14 and result.meta["bits"] == 4
    for name in spec.modules:
        w_name = f"{name}.weight"
        t = result.activation_state[f"{name}.act_transform"]
        t_inv = result.activation_state[f"{name}.act_transform_inv"]
        assert result.activation_state[f"{name}.act_clip"].shape == (1,)
        q = dequantize_packed(result.packed, w_name, tuple(before[w_name].shape), 4, zero_point=8)
        # the stored weight is Q(W T^-T) T^T, the packed codes are those of Q(W T^-T) ...
        assert torch.allclose(q @ t.T, result.state_dict[w_name], atol=1e-5)
        # ... which is W T^-T rounded to nearest on its per-channel min-max grid (no lwc here)
        w_t = before[w_name] @ t_inv.T
        step = result.packed[f"{w_name}.scales"].float()
        assert ((q - w_t).abs() <= step / 2 + 1e-5).all()
        assert torch.allclose(step, w_t.abs().amax(1, keepdim=True) / 7, rtol=1e-3)


def test_weight_only_variant_and_gptq_solver(trained):
    tokens = strided(16, 5)
    w16 = flatquant(iters=5, activation_bits=16).quantize(model_from(trained), tokens)
    assert "activations" not in w16.meta and not w16.activation_state
    gptq = flatquant(iters=5, weight_solver="gptq").quantize(model_from(trained), tokens)
    assert set(gptq.state_dict) == set(w16.state_dict)
    name = "model.layers.1.mlp.down_proj"
    q = dequantize_packed(gptq.packed, f"{name}.weight", (64, 192), 4, zero_point=8)
    assert torch.allclose(q @ gptq.activation_state[f"{name}.act_transform"].T, gptq.state_dict[f"{name}.weight"],
                          atol=1e-5)
    assert math.isfinite(mean_ce(model_from(trained), tokens, gptq))


def test_validation():
    tokens = strided(4, 6)
    with pytest.raises(ValidationError, match=r"activation_bits\n  Input should be 4, 8 or 16"):
        FlatQuantQuantizer.Params(activation_bits=6)
    with pytest.raises(ValidationError, match=r"mode\n  Input should be 'block' or 'window'"):
        FlatQuantQuantizer.Params(mode="layer")  # one transform per group: q/k/v must learn together
    with pytest.raises(QuantizationError, match="activation_bits"):
        FlatQuantQuantizer(FlatQuantQuantizer.Params(activations={"bits": 4})).quantize(nano(), tokens)
    with pytest.raises(QuantizationError, match="calibration"):
        flatquant().quantize(nano(), None)


class _CountingQuant:
    """8-bit RTN weight whose optional ``fake_input`` counts calls (engine hook check)."""

    def __init__(self, weight, with_input):
        self.weight, self.calls = weight.detach().clone(), 0
        self.grid = IntGrid(8, "per_channel", 128, True)
        if with_input:
            self.fake_input = self._fake_input

    def _fake_input(self, x):
        self.calls += 1
        return x

    def parameters(self):
        return []

    def fake_weight(self):
        return self.finalize()[3]

    def regularization(self, step):
        return 0.0

    def finalize(self):
        return self.grid.quantize(self.weight, self.grid.view(self.weight).abs().amax(-1) / 127)


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_engine_feeds_inputs_through_optional_fake_input(mode):
    from components.quant.reconstruction import ReconstructionConfig, reconstruct

    model, tokens = nano(), strided(4, 7)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    config = ReconstructionConfig(mode=mode, iters=0, progress=False)
    results = {}
    for with_input in (False, True):
        made = {}
        result = reconstruct(model, tokens, lambda n, l: made.setdefault(n, _CountingQuant(l.weight, with_input)),
                             config, names)
        results[with_input] = {u: (m["loss_before"], m["loss_after"]) for u, m in result.metrics.items()}
        if with_input:
            assert all(q.calls > 0 for q in made.values())
    assert results[True] == results[False]  # an identity fake_input changes nothing
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_packed_file_alone_rebuilds_the_weights_and_counts_the_transform(trained):
    """Codes + scales + each group's Kronecker factors and diagonal rebuild W_eff, also at 16-bit
    activations (no activation.safetensors), and bits_per_weight counts those factors."""
    result = flatquant(iters=5, activation_bits=16).quantize(model_from(trained), strided(16, 6))
    for group_owner, members in (("model.layers.0.self_attn.q_proj", ["q_proj", "k_proj", "v_proj"]),
                                 ("model.layers.1.mlp.down_proj", ["down_proj"])):
        left = result.packed[f"{group_owner}.transform_left"].double()
        right = result.packed[f"{group_owner}.transform_right"].double()
        diag = result.packed[f"{group_owner}.transform_diag"].double()
        t = diag[:, None] * torch.kron(left, right)
        for member in members:
            name = group_owner.rsplit(".", 1)[0] + "." + member + ".weight"
            shape = tuple(result.state_dict[name].shape)
            q = dequantize_packed(result.packed, name, shape, 4, zero_point=8).double()
            assert torch.allclose((q @ t.T).float(), result.state_dict[name], atol=1e-5), name
    assert "model.layers.0.self_attn.k_proj.transform_left" not in result.packed  # shared per group
    stored = sum(v.numel() * v.element_size() for v in result.packed.values())
    assert result.meta["packed_bytes"] == stored
    assert result.meta["bits_per_weight"] == stored * 8 / result.meta["n_quantized_weights"]
