"""The masked_lm evaluator: the same tokens scored at every length, losses that match a direct
computation, the increase a claim compares, and models or lengths it cannot score refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.eval.masked_lm import MaskedLmEvaluation
from components.eval.standard import StandardEvaluation
from components.model.presets import build_model
from components.train.mlm import pick_positions
from tests.components.train.test_mlm import ByteTokenizer

VOCAB, BLOCK, MASK = 64, 8, 0x1F


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(32, VOCAB, size=(n, BLOCK)).astype(np.int32)


def evaluate(model, test, **params):
    evaluator = MaskedLmEvaluation(MaskedLmEvaluation.Params(**{"lengths": [8, 16], **params}))
    return evaluator.evaluate(model, ByteTokenizer(), None, test, [], None)


def test_scores_the_same_masked_tokens_at_each_length_as_a_direct_computation():
    model = build_model("encoder_nano_learned", vocab_size=VOCAB, max_seq_len=BLOCK, seed=0).eval()
    test = {"a": blocks(6, 1), "b": blocks(4, 2)}
    out = evaluate(model, test, mask_rate=0.25, batch_size=2)
    picked = pick_positions(6, BLOCK, 0.25, torch.Generator().manual_seed(0))  # the evaluator's default seed
    assert (picked.sum(1) == 2).all()
    for length in (8, 16):
        ids = torch.as_tensor(test["a"].reshape(-1, length), dtype=torch.long)
        where = torch.as_tensor(picked.reshape(-1, length))
        with torch.no_grad():
            logits = model(input_ids=ids.masked_fill(where, MASK)).logits[where]
        expected = F.cross_entropy(logits, ids[where]).item()
        assert out[f"mlm_loss_{length}_a"] == pytest.approx(expected, rel=1e-5)
        assert out[f"mlm_acc_{length}_a"] == pytest.approx((logits.argmax(-1) == ids[where]).float().mean().item())
    total = (12 * out["mlm_loss_8_a"] + 8 * out["mlm_loss_8_b"]) / 20  # token-weighted over domains
    assert out["mlm_loss_8"] == pytest.approx(total, rel=1e-6)
    assert out["mlm_loss_increase_16"] == pytest.approx(out["mlm_loss_16"] - out["mlm_loss_8"])


def test_accuracy_is_the_share_of_masked_tokens_predicted_right():
    model = build_model("encoder_nano_learned", vocab_size=VOCAB, max_seq_len=BLOCK, seed=0).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: argmax predicts token 0 everywhere
    a = blocks(6, 1)
    a[:, ::2] = 0  # half the tokens are that token
    out = evaluate(model, {"a": a}, mask_rate=0.25, batch_size=2)
    picked = pick_positions(6, BLOCK, 0.25, torch.Generator().manual_seed(0)).numpy()
    expected = float((a[picked] == 0).mean())
    assert 0 < expected < 1
    for length in (8, 16):  # the same masked tokens at each length
        assert out[f"mlm_acc_{length}_a"] == pytest.approx(expected) == out[f"mlm_acc_{length}"]


def test_models_and_lengths_it_cannot_score_are_refused():
    encoder = build_model("encoder_nano_alibi", vocab_size=VOCAB, max_seq_len=BLOCK, seed=0)
    with pytest.raises(ValueError, match="length 12 is not a multiple of the test blocks' length 8"):
        evaluate(encoder, {"a": blocks(4, 1)}, lengths=[8, 12])
    with pytest.raises(ValueError, match="the a test split has 1 blocks of 8 tokens, too few for one sequence of 16"):
        evaluate(encoder, {"a": blocks(1, 1)})
    decoder = build_model("nano", vocab_size=VOCAB, max_seq_len=BLOCK, seed=0)
    with pytest.raises(ValueError, match="masked_lm scores masked-LM encoders; the model None is a causal decoder"):
        evaluate(decoder, {"a": blocks(4, 1)})
    with pytest.raises(ValueError, match="standard scores causal decoders; the model None is a masked-LM encoder"):
        StandardEvaluation(StandardEvaluation.Params()).evaluate(encoder, None, None, {"a": blocks(4, 1)}, [], None)
    with pytest.raises(ValueError, match="give distinct lengths"):
        MaskedLmEvaluation.Params(lengths=[8, 8])
