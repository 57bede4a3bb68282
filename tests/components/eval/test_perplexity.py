import math

import numpy as np
import pytest
import torch

from components.eval.perplexity import evaluate_perplexity
from components.model.presets import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=0)


def test_single_block_equals_hf_loss(model):
    block = np.random.default_rng(0).integers(0, 64, size=(1, 32))
    ids = torch.as_tensor(block)
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, labels=ids).loss)
    result = evaluate_perplexity(model, block)
    assert result["tokens"] == 31
    assert result["loss"] == pytest.approx(hf_loss, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(hf_loss), rel=1e-5)
    # an untrained model is near uniform over 64 tokens
    assert 30 < result["ppl"] < 130


def test_token_weighted_and_batch_invariant(model):
    blocks = np.random.default_rng(1).integers(0, 64, size=(5, 16))
    per_block = [evaluate_perplexity(model, blocks[i:i + 1])["loss"] for i in range(5)]
    whole = evaluate_perplexity(model, blocks, batch_size=2)  # batches of 2, 2, 1
    assert whole["tokens"] == 5 * 15
    assert whole["loss"] == pytest.approx(sum(per_block) / 5, rel=1e-5)
    assert evaluate_perplexity(model, blocks, batch_size=8)["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_restores_training_mode_and_rejects_bad_blocks(model):
    model.train()
    evaluate_perplexity(model, np.zeros((1, 4), dtype=np.int64))
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="block_len>=2"):
        evaluate_perplexity(model, np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="integer token ids"):
        evaluate_perplexity(model, np.zeros((2, 4), dtype=np.float32))
