"""Model scores are per document: the same whatever documents share a batch or a shard."""
from __future__ import annotations

import numpy as np
import pytest

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.lm_scoring import check_tokenizer_matches, document_losses, mean_pooled_states
from components.data.selector import SelectionError
from components.model.presets import build_model


@pytest.fixture(scope="module")
def scorer():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 60))) for _ in range(40)]
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=300, seq_len=32)).train(texts)
    return build_model("nano", len(tokenizer), 128, seed=0), tokenizer, texts


def test_losses_do_not_depend_on_the_shard(scorer):
    model, tokenizer, texts = scorer
    whole = document_losses(model, tokenizer, texts, max_tokens=64, batch_size=8)
    halves = np.concatenate([document_losses(model, tokenizer, part, max_tokens=64, batch_size=8)
                             for part in (texts[:23], texts[23:])])
    np.testing.assert_array_equal(whole, halves)  # bit for bit, not approximately
    assert np.isfinite(whole).all() and (whole > 0).all()


def test_embeddings_do_not_depend_on_the_batch(scorer):
    model, tokenizer, texts = scorer
    together = mean_pooled_states(model, tokenizer, texts, max_tokens=64, batch_size=8)
    alone = np.concatenate([mean_pooled_states(model, tokenizer, [t], max_tokens=64, batch_size=8) for t in texts])
    np.testing.assert_array_equal(together, alone)
    assert together.shape == (len(texts), model.config.hidden_size)


def test_tokenizer_mismatch_names_both_sizes(scorer):
    model, _, texts = scorer
    other = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=280, seq_len=32)).train(texts)
    with pytest.raises(SelectionError, match=rf"{model.get_input_embeddings().num_embeddings} tokens.*{len(other)}"):
        check_tokenizer_matches(model, other, "here")
