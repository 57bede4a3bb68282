"""BiPFT's binary network: the elastic binarizer's values and gradients against the reference's
formulas, binary weights and inputs in every projection, the attention with its five rank-1
estimators against the paper's scores, training and folding back, the artifact round trip
(plain Llama + side tensors, the same logits after loading), an exact resume, and refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from components.model.binary_network import (
    BinaryAttention, BinaryLinear, ElasticBinarizer, binary_attention_forward, has_binary_network,
    install_binary_network, remove_binary_network)
from components.quant.base import decode_packed
from components.train.bipft import BiPFTTraining
from components.train.trainer import train
from tasks.artifacts import ArtifactError
from tasks.model_io import SIDE_MODULES, load_model_artifact
from tests.components.train.test_hedgehog import side_module_artifact
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def bipft(**overrides):
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32")
    params.update(overrides)
    config = BiPFTTraining.Params(**params)
    return config, BiPFTTraining(config)


@pytest.mark.parametrize("signed", [True, False])
def test_the_elastic_binarizer_matches_the_reference_formulas(signed):
    """Forward sign(x) alpha (signed) or alpha clamp(round(x/alpha), 0, 1); alpha first set to
    2 mean|x| (4 for unsigned); the input's gradient passes where -1 (0) <= x/alpha <= 1; alpha's is
    sum(sign(q) g) (signed) or sum((q > 1) + (round(q) - q) inside) g, over sqrt(numel)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g) if signed else torch.rand(6, 10, generator=g) ** 4  # skewed, like probabilities
    grad = torch.randn(6, 10, generator=g)
    binarizer = ElasticBinarizer(signed)
    x_in = x.clone().requires_grad_()
    out = binarizer(x_in)
    alpha = (2.0 if signed else 4.0) * x.abs().mean()
    assert binarizer.alpha.item() == pytest.approx(alpha.item()) and binarizer.initialized.item() == 1.0
    q = x / alpha
    codes = q.sign() if signed else q.round().clamp(0, 1)
    assert torch.allclose(out, codes * alpha)
    assert set(out.unique().tolist()) <= {-alpha.item(), alpha.item(), 0.0} | ({0.0} if not signed else set())
    out.backward(grad)
    inside = (q >= (-1 if signed else 0)) & (q <= 1)
    assert 0 < inside.sum() < inside.numel()  # both sides of the clip are exercised
    assert torch.equal(x_in.grad, grad * inside)
    step = q.sign() if signed else (q > 1).float() + torch.where(inside, q.round() - q, torch.zeros_like(q))
    assert binarizer.alpha.grad.item() == pytest.approx(((step * grad).sum() / math.sqrt(60)).item(), rel=1e-5)
    binarizer(x * 10)  # later inputs do not reset the learned scale
    assert binarizer.alpha.item() == pytest.approx(alpha.item())


def test_every_projection_computes_on_binary_weights_and_binary_inputs():
    model = nano()
    assert install_binary_network(model, estimators=True) == 2 * 7
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BinaryLinear)
    weight = layer.effective_weight().detach()
    magnitude = layer.weight.detach().abs().mean()
    assert torch.allclose(weight.abs(), torch.full_like(weight, magnitude.item()))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.move.fill_(0.25)
        y = layer(x)
    alpha = layer.binarize_input.alpha.detach()
    assert torch.allclose(y, ((x + 0.25).sign() * alpha) @ weight.T, atol=1e-6)


def test_the_estimators_add_the_papers_residual_terms_to_scores_and_context():
    torch.manual_seed(0)
    b, h, n, d, hidden = 2, 2, 5, 4, 8
    module = torch.nn.Module()
    module.binary, module.layer_idx = BinaryAttention(hidden, estimators=True), 0
    query, key, value = (torch.randn(b, h, n, d) for _ in range(3))
    states = torch.randn(b, n, hidden)
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1).expand(b, 1, n, n)
    module.binary.hidden = states
    out, probs = binary_attention_forward(module, query, key, value, causal, scaling=d ** -0.5)

    side = module.binary
    qb, kb, vb = (side.query(query), side.key(key), side.value(value))  # already initialised: same alphas
    q_p, k_p, q_m, k_m, v_p = (states @ side.estimate.weight.T + side.estimate.bias).detach().unbind(-1)
    low_rank = (torch.einsum("bi,bj->bij", q_m, k_p) + torch.einsum("bi,bj->bij", q_p, k_m)
                + torch.einsum("bi,bj->bij", q_p, k_p))
    scores = (qb @ kb.transpose(-1, -2) + low_rank[:, None]) * d ** -0.5 + causal
    p = torch.softmax(scores, -1)
    alpha = side.probs.alpha.detach()
    p_b = (p / alpha).round().clamp(0, 1) * alpha
    expected = p_b @ vb + (p_b @ v_p[:, None, :, None])
    assert torch.allclose(probs, p_b, atol=1e-6) and torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    assert probs[..., 0, 1:].abs().max() == 0  # causal: the first query sees only itself
    assert module.binary.hidden is None  # the recorded input is dropped once used


def test_bipft_trains_folds_back_and_loads_as_the_same_binary_model(tmp_path):
    config, method = bipft(steps=30, lr=1e-2)
    model = nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    # measured: mean loss of the first 3 steps 4.11, of the last 3 0.98 (without estimators 3.86 and 0.04)
    assert sum(result.losses[-3:]) < 0.8 * sum(result.losses[:3])
    assert not has_binary_network(model) and model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, BinaryLinear) for m in model.modules())
    side = method.auxiliary_tensors()
    hidden = model.config.hidden_size
    assert result.method_facts == {"binary_network": {"estimators": True}, "binary_layers": 14,
                                   "estimator_params": 2 * 5 * (hidden + 1)}
    for name, linear in model.model.layers[1].named_modules():  # the saved weights are binary
        if isinstance(linear, torch.nn.Linear):
            assert linear.weight.abs().unique().numel() == 1, name

    quantized = method.pack(model)  # one sign bit per weight, one magnitude per tensor, the side tensors
    meta = quantized.meta
    assert len(meta["quantized_tensors"]) == 14 and {t["format"] for t in meta["tensors"].values()} == {"sign"}
    for name, spec in meta["tensors"].items():
        assert torch.equal(decode_packed(quantized.packed, name, spec), model.get_parameter(name)), name
    assert all(torch.equal(quantized.packed[k], v) for k, v in side.items())
    n_weights = meta["n_quantized_weights"]
    side_bytes = sum(4 * v.numel() for v in side.values())
    assert meta["side_tensor_bytes"] == side_bytes
    assert meta["packed_bytes"] == n_weights // 8 + 4 * 14 + side_bytes

    art = side_module_artifact(tmp_path, model, result.method_facts, side)
    with pytest.raises(ArtifactError, match=r"has a binary network \(BiPFT\) .* would save a model without them"):
        load_model_artifact(art)
    loaded, _, _ = load_model_artifact(art, keeps=SIDE_MODULES)
    reference = nano()
    reference.load_state_dict(model.state_dict())
    install_binary_network(reference, True, side)
    ids = torch.as_tensor(pattern_blocks()[:2], dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5)
        plain = nano()
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-2)  # the binary network is in use


def binary_nano_with_its_scales_set():
    """A nano BiPFT network whose first forward has set every scale, and that forward's ids."""
    torch.manual_seed(0)
    model = nano()
    install_binary_network(model, estimators=True)
    ids = torch.as_tensor(pattern_blocks()[:2], dtype=torch.long)
    with torch.no_grad():
        model(ids)
    return model, ids


def test_a_kv_cache_keeps_the_key_side_maps_and_decodes_as_the_full_forward_does():
    model, ids = binary_nano_with_its_scales_set()
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.cache, use_cache=True).logits[:, -1]
        assert torch.allclose(step, full, atol=1e-4)
        cached = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        with pytest.raises(RuntimeError, match="the estimators hold inputs of 16 tokens for 17 keys"):
            prefix = model(ids, use_cache=True)  # a cache whose maps were then dropped
            prefix.cache.binary_maps = {0: prefix.cache.binary_maps[0][:, :15]}
            model(ids[:, -1:], cache=prefix.cache, use_cache=True)


def test_beam_search_and_cropping_move_the_kept_maps_with_the_cache():
    model, ids = binary_nano_with_its_scales_set()
    with torch.no_grad():
        cached = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, num_beams=3, use_cache=True)
        uncached = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, num_beams=3, use_cache=False)
        assert torch.equal(cached, uncached)
        prompt = model(ids, use_cache=True).cache  # a prompt's cache reused through deepcopy
        kept = {layer: maps.clone() for layer, maps in prompt.binary_maps.items()}
        reused = copy.deepcopy(prompt)
        reused.reorder_cache(torch.tensor([1, 0]))
        assert all(torch.equal(prompt.binary_maps[layer], maps) for layer, maps in kept.items())  # untouched
        assert all(torch.equal(reused.binary_maps[layer], maps[[1, 0]]) for layer, maps in kept.items())
        cache = model(ids[:, :10], use_cache=True).cache
        before = {layer: maps.clone() for layer, maps in cache.binary_maps.items()}
        cache.reorder_cache(torch.tensor([1, 1]))  # beam search keeps the second row twice
        assert before and all(torch.equal(cache.binary_maps[layer], before[layer][[1, 1]]) for layer in before)
        cache.crop(-3)  # assisted decoding drops the last 3 tokens
        assert all(maps.shape[1] == 7 for maps in cache.binary_maps.values())
        rows = ids[[1, 1], :8]  # decoding on from the reordered, cropped cache is the full forward
        step = model(rows[:, 7:], cache=cache, use_cache=True).logits[:, -1]
        assert torch.allclose(step, model(rows).logits[:, -1], atol=1e-4)


def test_folding_back_and_installing_again_computes_the_same_function():
    torch.manual_seed(0)
    model = nano()
    install_binary_network(model, estimators=True)
    ids = torch.as_tensor(pattern_blocks()[:2], dtype=torch.long)
    with torch.no_grad():
        before = model(ids).logits
        state = remove_binary_network(model)
        install_binary_network(model, True, state)  # BWN of a binary weight is itself
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match=r"the saved tensors do not fit this model \(missing \[.*estimate"):
        install_binary_network(nano(), True, {k: v for k, v in state.items() if ".estimate." not in k})


def test_bipft_resumes_exactly_with_its_scales(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: bipft(checkpoint_every=4, estimators=False))


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError, match="attention='eager': bipft trains through its own binary attention"):
        bipft(attention="eager")
    model = nano()
    install_binary_network(model, estimators=False)
    with pytest.raises(ValueError, match="already a binary network"):
        bipft()[1].prepare(model)


@pytest.mark.slow  # ~40 s of inductor compiling on 2 cores
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bipft_trains_compiled(precision):
    """The recipe's runs compile ('auto'); a bf16 estimator product once broke inductor's C++ codegen."""
    config, method = bipft(steps=4, precision=precision, torch_compile=True)
    result = train(nano(), pattern_blocks(), config, method, progress=False)
    assert result.compiled and len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
