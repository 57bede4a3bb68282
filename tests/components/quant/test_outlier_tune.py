import math

import pytest
import torch
from pydantic import ValidationError

import components.quant.activation as activation
import components.quant.outlier_tune as outlier_tune
from components.model.presets import build_model
from components.quant.activation import ActivationSpec, fake_quant_activation, install_activation_quant
from components.quant.base import QuantizationError, dequantize_packed
from components.quant.outlier_tune import OutlierTuneQuantizer, activation_scales, fold_quantize_weight
from components.quant.registry import QUANTIZERS

VOCAB, SEQ = 64, 32


def nano(seed=0):
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed)


def pattern_tokens(n, seed):
    """Learnable sequences: t[i+1] = (3 t[i] + 1) mod 64 from a random start."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    steps = [start]
    for _ in range(SEQ - 1):
        steps.append((3 * steps[-1] + 1) % VOCAB)
    return torch.cat(steps, dim=1)


def ot(**params):
    return OutlierTuneQuantizer(OutlierTuneQuantizer.Params(**params))


def mean_ce(model, tokens):
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nano()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = pattern_tokens(256, seed=1)
    for step in range(60):
        batch = data[(step * 16) % 256:(step * 16) % 256 + 16]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_from(state):
    model = nano()
    model.load_state_dict(state)
    return model.eval()


def test_registry_entry():
    assert QUANTIZERS.get("outlier_tune") is OutlierTuneQuantizer
    assert OutlierTuneQuantizer.paper.arxiv == "2406.18832"
    assert OutlierTuneQuantizer.needs_calibration


@pytest.mark.parametrize("symmetrize,fold_scales", [(True, True), (False, True), (True, False)])
def test_fold_unfold_and_symmetrization_exact_without_quantization(monkeypatch, symmetrize, fold_scales):
    def identity_weights(w, bits, granularity, group_size, symmetric, name="w"):
        return (torch.zeros_like(w, dtype=torch.uint8), torch.ones(w.shape[0], 1, dtype=torch.float16),
                None, w.clone())

    model = nano()
    tokens = pattern_tokens(8, seed=2)
    with torch.no_grad():
        reference = model(input_ids=tokens).logits
    monkeypatch.setattr(outlier_tune, "quantize_tensor", identity_weights)
    q = ot(bits=8, activation_bits=8, symmetrize=symmetrize, fold_scales=fold_scales).quantize(model, tokens)
    name = "model.layers.0.mlp.down_proj"
    scale = q.activation_state[f"{name}.act_scale"]
    assert scale.shape == ((192,) if fold_scales else (1,))
    assert (f"{name}.act_shift" in q.activation_state) == symmetrize
    if fold_scales:  # the stored weight really went through W diag(s) and back
        assert scale.max() / scale.min() > 2
        assert not torch.equal(q.state_dict[f"{name}.weight"], model.state_dict()[f"{name}.weight"])
    if symmetrize:
        assert q.activation_state[f"{name}.act_shift"].abs().max() > 0
    q.load_into(model)
    monkeypatch.setattr(activation, "fake_quant_int", lambda x, scale, zero=None, bits=8, symmetric=True: x)
    install_activation_quant(model, ActivationSpec.from_meta(q.meta["activations"]), q.activation_state)
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    assert torch.allclose(out, reference, atol=1e-5, rtol=0)


def test_symmetrization_centres_each_channel_and_is_undone_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 16, generator=g) * torch.rand(16, generator=g) * 3 + torch.randn(16, generator=g) * 10
    step, shift, absmax = activation_scales(x.amin(1), x.amax(1), bits=8)
    lo, hi = (x - shift).amin((0, 1)), (x - shift).amax((0, 1))
    assert torch.allclose(absmax, torch.maximum(-lo, hi))
    assert ((hi + lo).abs() <= 0.25 * (hi - lo)).all()  # ranges centred on 0 (up to sequence spread)
    identity = {"act_shift": shift}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(activation, "fake_quant_int", lambda x, scale, zero=None, bits=8, symmetric=True: x)
        y = fake_quant_activation(x, ActivationSpec(8, ("m",)), {**identity, "act_scale": step})
    assert torch.allclose(y, x, atol=1e-6, rtol=0)


def layer_error(x, weight, step, shift, bits):
    fold = step.numel() > 1
    *_, w_eff = fold_quantize_weight(weight, step if fold else None, 8, False)
    side = {"act_scale": step, "act_shift": shift}
    y = fake_quant_activation(x, ActivationSpec(bits, ("m",)), side) @ w_eff.T
    return (y - x @ weight.T).pow(2).mean().item()


def test_per_channel_beats_per_tensor_on_outlier_channels_at_a6():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 128, generator=g)
    gain, offset = torch.ones(128), torch.zeros(128)
    gain[[3, 17]], offset[[3, 17]] = 20.0, 40.0  # structured, one-sided outlier channels
    x = x * gain + offset  # evaluated on the calibration data itself: no saturation noise
    weight = torch.randn(24, 128, generator=g) / 6
    mins, maxs = x.amin(1), x.amax(1)
    per_tensor = layer_error(x, weight, *activation_scales(mins, maxs, 6, True, False)[:2], bits=6)
    per_channel = layer_error(x, weight, *activation_scales(mins, maxs, 6, True, True)[:2], bits=6)
    no_sym = layer_error(x, weight, *activation_scales(mins, maxs, 6, False, True)[:2], bits=6)
    assert per_channel < per_tensor / 20
    # symmetrization shrinks the outlier channels' range, so W diag(s) is easier to quantize too
    assert per_channel < no_sym / 2


def test_emulation_composes_to_the_integer_deployment():
    model = nano()
    tokens = pattern_tokens(8, seed=3)
    q = ot(bits=6, activation_bits=6).quantize(model, tokens)
    spec = ActivationSpec.from_meta(q.meta["activations"])
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        name = f"{module}.weight"
        info = q.meta["tensors"][name]
        assert info["folded_act_scale"] and info["bits"] == 6
        folded = dequantize_packed(q.packed, name, tuple(info["shape"]), 6)  # Q(W diag(s))
        s = q.packed[f"{name}.act_scale"]
        assert torch.equal(s, q.activation_state[f"{module}.act_scale"])
        z = q.activation_state[f"{module}.act_shift"]
        w_eff = q.state_dict[name]
        assert torch.allclose(w_eff, folded / s, rtol=1e-6, atol=0)
        x = torch.randn(3, 5, s.numel(), generator=torch.Generator().manual_seed(4)) * s * 20 + z
        x_int = torch.clamp(torch.round((x - z) / s), -31, 31)  # what the integer kernel sees
        deployed = x_int @ folded.T + folded @ (z / s)  # bias folded offline: W_eff z
        emulated = fake_quant_activation(x, spec, {"act_scale": s, "act_shift": z}) @ w_eff.T
        assert torch.allclose(emulated, deployed, rtol=1e-4, atol=1e-5 * deployed.abs().max().item())


def test_hooks_apply_and_activation_quantization_costs_perplexity(trained, tmp_path):
    tokens = pattern_tokens(32, seed=5)
    calibration = pattern_tokens(16, seed=6)
    fp_ce = mean_ce(model_from(trained), tokens)
    model = model_from(trained)
    q = ot(bits=8, activation_bits=4).quantize(model, calibration)
    q.load_into(model)
    spec = ActivationSpec.from_meta(q.meta["activations"])
    assert len(spec.modules) == 14 and spec.bits == 4
    weight_only = mean_ce(model, tokens)
    with torch.no_grad():
        logits_w = model(input_ids=tokens).logits
    handles = install_activation_quant(model, spec, q.activation_state)
    with torch.no_grad():
        logits_wa = model(input_ids=tokens).logits
    w8a4 = mean_ce(model, tokens)
    for h in handles:
        h.remove()
    assert fp_ce < 1.0  # the model learned the pattern
    assert not torch.allclose(logits_w, logits_wa, atol=1e-4)
    assert math.exp(w8a4) >= math.exp(weight_only)
    assert abs(weight_only - fp_ce) < 0.05
    q.save_packed(tmp_path / "q.safetensors")


def test_ablation_variants_store_the_right_side_tensors():
    model = nano()
    tokens = pattern_tokens(8, seed=7)
    base = ot(fold_scales=False, symmetrize=False).quantize(model, tokens)
    assert all(v.shape == (1,) for v in base.activation_state.values())
    assert not any(k.endswith("act_scale") for k in base.packed)
    ref = ot(channelwise="norm_inputs").quantize(model, tokens)
    assert "model.layers.0.self_attn.q_proj.act_scale" in ref.activation_state
    assert not any(".o_proj." in k or ".down_proj." in k for k in ref.activation_state)
    assert "model.layers.0.mlp.down_proj" in ref.meta["activations"]["modules"]  # dynamic per token
    clipped = ot(clip_ratio=0.5).quantize(model, tokens)
    full = ot().quantize(model, tokens)
    key = "model.layers.0.mlp.down_proj.act_scale"
    assert (clipped.activation_state[key] <= full.activation_state[key] + 1e-12).all()
    assert (clipped.activation_state[key] < full.activation_state[key]).any()


def test_bad_input_is_refused():
    tokens = pattern_tokens(4, seed=8)
    with pytest.raises(ValidationError):
        OutlierTuneQuantizer.Params(bits=5)
    for field in ("bits", "activation_bits"):
        params = OutlierTuneQuantizer.Params.model_construct(**{field: 5})
        with pytest.raises(QuantizationError, match=f"{field}=5"):
            OutlierTuneQuantizer(params).quantize(nano(), tokens)
    with pytest.raises(QuantizationError, match="needs calibration data"):
        ot().quantize(nano(), None)
    with pytest.raises(QuantizationError, match="activation quantization"):
        quantizer = ot(activations={"bits": 8})
        quantizer.with_activations(quantizer.quantize(nano(), tokens))
