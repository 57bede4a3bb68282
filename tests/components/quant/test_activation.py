import pytest
import torch

from components.model.presets import build_model
from components.quant.activation import ActivationSpec, fake_quant_activation, install_activation_quant
from components.quant.base import QuantizationError
from components.quant.rtn import RtnQuantizer


def nano():
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=0)


def test_dynamic_per_token_error_within_half_step():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))
    y = fake_quant_activation(x, ActivationSpec(8, ("m",)), {})
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((y - x).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(x, y)


def test_shift_and_orthogonal_transform_are_undone_exactly_at_high_bits():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g) * 3 + 5
    t = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    side = {"act_shift": torch.randn(16, generator=g), "act_transform": t, "act_transform_inv": t.T}
    y = fake_quant_activation(x, ActivationSpec(16, ("m",)), side)
    assert torch.allclose(x, y, atol=5e-4)


def test_static_scale_and_minifloat_formats():
    x = torch.linspace(-2, 2, 9).reshape(1, 9)
    y = fake_quant_activation(x, ActivationSpec(4, ("m",)), {"act_scale": torch.tensor([0.5])})
    assert torch.equal(y, torch.round(x / 0.5).clamp(-7, 7) * 0.5)
    y8 = fake_quant_activation(x * 100, ActivationSpec(8, ("m",), format="e4m3"), {})
    # per-token scaling maps the absmax (200) onto e4m3's max (448), so it is represented exactly
    assert torch.isclose(y8.abs().max(), torch.tensor(200.0))


def test_with_activations_param_installs_hooks_that_change_the_logits():
    model = nano()
    params = RtnQuantizer.Params(bits=8, granularity="per_channel", activations={"bits": 4})
    quantizer = RtnQuantizer(params)
    q = quantizer.with_activations(quantizer.quantize(model))
    q.load_into(model)
    spec = ActivationSpec.from_meta(q.meta["activations"])
    assert len(spec.modules) == 14 and spec.bits == 4
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight_only = model(input_ids=tokens).logits
        handles = install_activation_quant(model, spec, {})
        w8a4 = model(input_ids=tokens).logits
        for h in handles:
            h.remove()
        again = model(input_ids=tokens).logits
    assert not torch.allclose(weight_only, w8a4, atol=1e-4)
    assert torch.equal(weight_only, again)


def test_bad_specs_are_refused():
    with pytest.raises(QuantizationError, match="bits=1"):
        ActivationSpec(1, ("m",))
    with pytest.raises(QuantizationError, match="'e9z1'"):
        ActivationSpec(8, ("m",), format="e9z1")
    with pytest.raises(QuantizationError, match="has 4 bits but bits=8"):
        ActivationSpec(8, ("m",), format="e2m1")
    with pytest.raises(QuantizationError, match="lacks"):
        install_activation_quant(nano(), ActivationSpec(8, ("model.layers.9.mlp.up_proj",)), {})
