"""Hedgehog linear attention: the quadratic and chunked forms against the prefix-sum recurrence, a KV cache,
softmax outputs while distilling, a real distillation that lowers the attention KL by training
the maps alone, the artifact round trip (plain Llama + maps beside it), an exact resume, and
refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from components.model.linear_attention import (
    FeatureMap, chunked_causal_linear_attention, feature_map_state, has_linear_attention, install_linear_attention,
    linear_attention_forward, recorded_attention_kl, set_distill_attention)
from components.train.dense import DenseTraining
from components.train.hedgehog import HedgehogConversion
from components.train.method import AUXILIARY_FILE
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS
from components.train.trainer import train
from tasks.artifacts import Artifact, ArtifactError
from tasks.model_io import FACTS, load_model_artifact
from tests.components.train.test_trainer import VOCAB, assert_resume_is_exact, nano, pattern_blocks


def hedgehog(**overrides):
    params = dict(phase="distill", steps=12, batch_size=8, lr=1e-2, warmup_steps=0, precision="fp32")
    params.update(overrides)
    config = HedgehogConversion.Params(**params)
    return config, HedgehogConversion(config)


@pytest.fixture(scope="module")
def trained():
    """A nano model trained on the pattern blocks, so its softmax attention is far from uniform."""
    torch.manual_seed(0)
    model = nano()
    config = DenseTraining.Params(steps=40, batch_size=8, lr=1e-2, warmup_steps=0, precision="fp32")
    train(model, pattern_blocks(), config, DenseTraining(config), progress=False)
    return model.state_dict()


def trained_nano(state):
    model = nano()
    model.load_state_dict(state)
    return model


def test_registered_for_finetuning_only():
    assert FINETUNE_METHODS.get("hedgehog") is HedgehogConversion
    assert "hedgehog" not in PRETRAIN_METHODS.keys()


@pytest.mark.parametrize("kind", ["hedgehog", "elu"])
def test_the_quadratic_and_chunked_forms_are_the_causal_prefix_sum_recurrence(kind):
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 7, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    module = torch.nn.Module()
    module.feature_map = FeatureMap(kind, h, d).double()
    if kind == "hedgehog":
        with torch.no_grad():
            for p in module.feature_map.parameters():
                p.add_(0.3 * torch.randn_like(p))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    quadratic, weights = linear_attention_forward(module, q, k, v, causal, scaling=d ** -0.5)  # a mask: n x n
    linear_time, none = linear_attention_forward(module, q, k, v, None, scaling=d ** -0.5)  # plain causal
    assert weights.shape == (b, h, n, n) and none is None
    phi_q, phi_k = module.feature_map(q, k)
    chunked = chunked_causal_linear_attention(phi_q, phi_k, v, chunk=3).transpose(1, 2)  # chunks 3, 3, 1
    state = torch.zeros(b, h, phi_k.shape[-1], d, dtype=torch.float64)  # sum_j phi(k_j) v_j^T
    norm = torch.zeros(b, h, phi_k.shape[-1], dtype=torch.float64)     # sum_j phi(k_j)
    for i in range(n):
        state += phi_k[:, :, i, :, None] * v[:, :, i, None, :]
        norm += phi_k[:, :, i]
        expected = (phi_q[:, :, i, None, :] @ state).squeeze(-2) / (phi_q[:, :, i] * norm).sum(-1, keepdim=True)
        for out in (quadratic, linear_time, chunked):
            torch.testing.assert_close(out[:, i], expected)


def test_a_kv_cache_gives_the_full_forwards_logits_and_distilling_keeps_softmax_outputs(trained):
    model = trained_nano(trained).eval()
    ids = torch.from_numpy(pattern_blocks(2)[:, :12]).long()
    softmax_logits = model(input_ids=ids).logits
    install_linear_attention(model, "hedgehog")
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:9], cache=prefix.past_key_values).logits
    torch.testing.assert_close(step[:, -1], full[:, 8], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, softmax_logits, atol=1e-3)  # linear attention is a different function
    set_distill_attention(model, True)
    torch.testing.assert_close(model(input_ids=ids).logits, softmax_logits, atol=1e-5, rtol=1e-5)
    assert recorded_attention_kl(model) > 0


def test_distillation_trains_the_maps_alone_and_lowers_the_attention_kl(trained, tmp_path):
    model = trained_nano(trained)
    config, method = hedgehog(steps=30)
    result = train(model, pattern_blocks(), config, method, progress=False)
    # measured: the KL of the first 3 steps 0.20, of the last 3 0.08
    assert np.mean(result.losses[-3:]) < 0.5 * np.mean(result.losses[:3])
    n_layers, heads, head_dim = 2, 2, 32
    assert result.trainable_params == n_layers * 2 * (heads * head_dim * head_dim + heads * head_dim)
    # the saved model is the untouched plain Llama; the maps are beside it
    assert not has_linear_attention(model) and model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    maps = method.auxiliary_tensors()
    assert len(maps) == n_layers * 4 and result.method_facts["linear_attention"] == {"feature_map": "hedgehog"}

    # the artifact round trip: loading installs the distilled maps again
    art = side_module_artifact(tmp_path, model, result.method_facts, maps)
    with pytest.raises(ArtifactError, match=r"has hedgehog linear attention .* would save a model without them"):
        load_model_artifact(art)
    loaded, _, _ = load_model_artifact(art, keeps=("linear_attention",))
    assert has_linear_attention(loaded)
    assert all(torch.equal(v, maps[k]) for k, v in feature_map_state(loaded).items())


def side_module_artifact(path, model, facts: dict, side: dict) -> Artifact:
    """A model artifact by hand: the plain weights, a tokenizer, the facts and the side tensors."""
    model.save_pretrained(str(path))
    _save_tokenizer(path)
    (path / FACTS).write_text(json.dumps(facts))
    save_file(side, str(path / AUXILIARY_FILE))
    return Artifact(path, {"digest": "d" * 64, "kind": "finetune", "files": {}})


def _save_tokenizer(path):
    """A word-level tokenizer over the nano vocabulary (load_model_artifact reads one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0")
    tok.save_pretrained(str(path))


def test_finetuning_with_linear_attention_lowers_the_loss(trained):
    config, method = hedgehog(phase="finetune", feature_map="elu", steps=30, lr=3e-3)
    result = train(trained_nano(trained), pattern_blocks(), config, method, progress=False)
    # measured: the mean loss of the first 3 steps 0.051, of the last 3 0.006
    assert np.mean(result.losses[-3:]) < 0.5 * np.mean(result.losses[:3])
    assert result.trainable_params == sum(p.numel() for p in nano().parameters())
    assert method.auxiliary_tensors() == {}  # elu+1 has nothing to keep


def test_a_distillation_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: hedgehog(checkpoint_every=4))


def test_refusals_name_the_key():
    with pytest.raises(ValueError, match="phase 'distill' needs feature_map 'hedgehog'"):
        hedgehog(feature_map="elu")
    with pytest.raises(ValueError, match="attention='eager': hedgehog trains through its own linear attention"):
        hedgehog(attention="eager")
    model = nano()
    install_linear_attention(model, "elu")
    with pytest.raises(ValueError, match="already has 'elu' linear attention, but params.feature_map is 'hedgehog'"):
        train(model, pattern_blocks(), *hedgehog(), progress=False)
    with pytest.raises(ValueError, match="the saved feature maps do not fit this model"):
        install_linear_attention(nano(), "hedgehog", {"model.layers.0.self_attn.feature_map.x": torch.zeros(1)})


def test_the_evaluator_measures_the_attention_kl_of_a_map_in_softmaxs_place_and_takes_it_off(trained, tmp_path):
    from components.eval.standard import StandardEvaluation

    model = trained_nano(trained).eval()
    blocks = {"pattern": pattern_blocks(8)}
    evaluator = StandardEvaluation(StandardEvaluation.Params(attention_kl_maps=("elu", "hedgehog")))
    before = evaluator.evaluate(model, None, None, blocks, [], tmp_path)
    assert before["attention_kl_elu"] > before["attention_kl_hedgehog"] > 0
    assert "attention_kl" not in before and not has_linear_attention(model)
    install_linear_attention(model, "elu")
    after = evaluator.evaluate(model, None, None, blocks, [], tmp_path)
    assert after["attention_kl"] == pytest.approx(before["attention_kl_elu"])
    assert after["loss_all"] != pytest.approx(before["loss_all"])  # scored with its linear attention


def test_prepacked_prefill_of_a_linear_attention_model_matches_each_prompts_own_forward(trained):
    """Evaluation packs several prompts in a row under a block-diagonal mask; linear attention takes it."""
    from components.eval.prepacking import prepacked_next_token_logits

    model = trained_nano(trained).eval()
    install_linear_attention(model, "hedgehog")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(3, 12, size=7)]
    packed, stats = prepacked_next_token_logits(model, prompts, bin_size=24, rows_per_batch=2)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert max(stats.rows) > 1


@pytest.mark.parametrize("phase", ["distill", "finetune"])
def test_both_phases_train_under_bf16_autocast(trained, phase):
    config, method = hedgehog(phase=phase, steps=2, precision="bf16")
    result = train(trained_nano(trained), pattern_blocks(), config, method, progress=False)
    assert result.precision == "bf16" and all(np.isfinite(result.losses))


def test_distilling_counts_one_forward_and_fine_tuning_three_plus_the_maps():
    from components.train.method import forward_flops_per_token

    model, forward = nano(), forward_flops_per_token(nano(), 16)
    maps = 3 * 2 * 2 * 2 * 2 * 32 ** 2  # fwd+bwd, 2 FLOPs per MAC, q and k, 2 layers, 2 heads of 32
    assert hedgehog()[1].flops_per_token(model, 16) == forward + maps
    assert hedgehog(phase="finetune")[1].flops_per_token(model, 16) == 3 * forward + maps
    assert hedgehog(phase="finetune", feature_map="elu")[1].flops_per_token(model, 16) == 3 * forward
