"""The MosaicBERT-style encoder: ALiBi's symmetric bias, unpadding that changes nothing but the
work, positions that see order (or not), and a save/load round trip through transformers."""
from __future__ import annotations

import pytest
import torch

from components.model.encoder import EncoderConfig, EncoderForMaskedLM, alibi_bias, alibi_slopes
from components.model.presets import ENCODER_PRESETS, build_model, is_encoder, load_model

VOCAB = 64


def encoder(position: str = "alibi", glu: bool = True) -> EncoderForMaskedLM:
    torch.manual_seed(0)
    return EncoderForMaskedLM(EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=48,
                                            max_position_embeddings=32, position=position, glu=glu)).eval()


def test_alibi_is_symmetric_with_press_slopes():
    assert torch.allclose(alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    assert torch.allclose(alibi_slopes(6)[:4], alibi_slopes(4)) and len(alibi_slopes(6)) == 6
    bias = alibi_bias(4, 5)
    assert torch.equal(bias, bias.transpose(1, 2)) and (bias.diagonal(dim1=1, dim2=2) == 0).all()
    assert bias[0, 0, 3] == pytest.approx(-0.25 * 3)


@pytest.mark.parametrize("position", ["alibi", "learned", "none"])
def test_unpadding_gives_the_real_tokens_the_logits_they_have_alone(position):
    model = encoder(position)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :6]).logits
        full = model(input_ids=ids[:1]).logits
    torch.testing.assert_close(padded[1, :6], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], full[0], atol=1e-5, rtol=1e-5)
    assert model.unpadded_tokens == 4 and (padded[1, 6:] == 0).all()  # the layers never computed them


def test_only_a_model_with_positions_sees_word_order():
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    for position, sees_order in (("alibi", True), ("learned", True), ("none", False)):
        model = encoder(position)
        with torch.no_grad():
            permuted_then_run = model(input_ids=ids[:, order]).logits
            run_then_permuted = model(input_ids=ids).logits[:, order]
        assert torch.allclose(permuted_then_run, run_then_permuted, atol=1e-5) != sees_order, position


def test_learned_positions_refuse_a_sequence_longer_than_their_table():
    with pytest.raises(ValueError, match="a sequence of 33 tokens is longer than the 32 learned positions"):
        encoder("learned")(input_ids=torch.zeros(1, 33, dtype=torch.long))
    encoder("alibi")(input_ids=torch.zeros(1, 33, dtype=torch.long))  # ALiBi has no table


def test_presets_build_and_a_saved_encoder_loads_back_through_transformers(tmp_path):
    assert sorted(ENCODER_PRESETS) == [f"encoder_{s}_{p}" for s in ("micro", "nano") for p in ("alibi", "learned", "none")]
    model = build_model("encoder_nano_learned", vocab_size=VOCAB, max_seq_len=16, seed=0)
    assert is_encoder(model) and model.config.max_position_embeddings == 64  # 4x the training length
    assert model.model.embed_positions is not None and model.config.glu
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is EncoderForMaskedLM
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="position 'rope': expected one of"):
        EncoderConfig(position="rope")
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_attention_heads 4"):
        EncoderConfig(hidden_size=30, num_attention_heads=4)


def test_a_saved_encoder_loads_only_where_a_stage_can_use_one(tmp_path, char_tokenizer):
    from tasks.artifacts import Artifact, ArtifactError
    from tasks.model_io import load_model_artifact, save_model_artifact

    save_model_artifact(build_model("encoder_nano_alibi", vocab_size=VOCAB, max_seq_len=16, seed=0), char_tokenizer,
                        tmp_path, {"kind": "pretrain", "method": "mlm"})
    art = Artifact(tmp_path, {"digest": "d" * 64, "kind": "pretrain", "files": {}})
    with pytest.raises(ArtifactError, match=r"is a masked-LM encoder; only method mlm trains one and only evaluate "
                                            r"method masked_lm scores one"):
        load_model_artifact(art)  # e.g. quantize, merge, prune or a distillation teacher
    loaded, _, facts = load_model_artifact(art, encoder_ok=True)
    assert is_encoder(loaded) and facts["method"] == "mlm"


def test_eager_and_sdpa_attention_compute_the_same():
    model = encoder("alibi")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        fused = model(input_ids=ids, attention_mask=mask).logits
        model.config._attn_implementation = "eager"
        written_out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, written_out, atol=1e-5, rtol=1e-5)
