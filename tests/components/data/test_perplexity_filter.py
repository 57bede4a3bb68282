import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.lm_scoring import document_losses
from components.data.perplexity_filter import PerplexityFilter
from components.data.registry import SELECTORS
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.model.presets import build_model
from tests.components.data.text_worlds import english, gibberish, train_nano


@pytest.fixture(scope="module")
def world():
    """English (in-domain) and gibberish docs, a tokenizer on both, a model trained on English."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    clean = [english(rng) for _ in range(140)]
    junk = [gibberish(rng) for _ in range(60)]
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=384, seq_len=64)).train(clean + junk)
    trained = train_nano(tokenizer, clean[:80], steps=40)
    untrained = build_model("nano", len(tokenizer), 64, seed=1).eval()
    pool = pd.DataFrame({"id": [f"doc-{i:03d}" for i in range(120)], "text": clean[80:140] + junk,
                         "domain": ["english"] * 60 + ["gibberish"] * 60})
    return dict(tokenizer=tokenizer, trained=trained, untrained=untrained, pool=pool)


def context(world, references, **kw):
    return SelectionContext(stage="ppl", seed=0, tokenizer=world["tokenizer"], references=references,
                            pool_sample=world["pool"], **kw)


def fitted(world, references, **params):
    selector = PerplexityFilter(PerplexityFilter.Params(keep_fraction=0.5, **params))
    selector.fit(context(world, references))
    return selector


def test_registered_and_declares_needs():
    assert SELECTORS.get("perplexity_filter") is PerplexityFilter
    assert PerplexityFilter.min_references == 1 and PerplexityFilter.needs_tokenizer
    assert not PerplexityFilter.needs_target


def test_keeps_in_domain_docs(world):
    pool = world["pool"]
    selector = fitted(world, [ReferenceModel("english_lm", world["trained"])])
    keep = selector.keep_mask(pool)
    is_clean = (pool["domain"] == "english").to_numpy()
    # Measured: every clean doc is in the kept half (recall 1.0), none of the gibberish.
    assert keep.sum() == 60
    assert keep[is_clean].mean() >= 0.95
    assert keep[~is_clean].mean() <= 0.05


def test_score_is_negative_mean_loss_and_shard_independent(world):
    pool = world["pool"]
    selector = fitted(world, [ReferenceModel("english_lm", world["trained"])], batch_size=7, max_tokens=48)
    scores = selector.scores(pool)
    losses = document_losses(world["trained"], world["tokenizer"], pool["text"].tolist(), max_tokens=48)
    np.testing.assert_allclose(scores, -losses, rtol=1e-4, atol=1e-5)
    # scored in other shards and batches, each document gets the same score
    parts = np.concatenate([selector.scores(pool.iloc[i:i + 13]) for i in range(0, len(pool), 13)])
    np.testing.assert_allclose(parts, scores, rtol=1e-4, atol=1e-5)


def test_reference_chosen_by_name(world):
    pool = world["pool"]
    is_clean = (pool["domain"] == "english").to_numpy()
    references = [ReferenceModel("untrained", world["untrained"]), ReferenceModel("english_lm", world["trained"])]
    by_default = fitted(world, references).keep_mask(pool)  # the first reference: an untrained model
    by_name = fitted(world, references, reference="english_lm").keep_mask(pool)
    assert by_name[is_clean].mean() >= 0.95
    assert by_default[is_clean].mean() < by_name[is_clean].mean()
    with pytest.raises(SelectionError, match=r"reference='nope'.*untrained, english_lm"):
        fitted(world, references, reference="nope")


def test_bad_inputs(world):
    other_vocab = build_model("nano", len(world["tokenizer"]) + 8, 64, seed=0)
    with pytest.raises(SelectionError, match="vocabulary"):
        fitted(world, [ReferenceModel("other", other_vocab)])
    with pytest.raises(SelectionError, match="tokenizer"):
        PerplexityFilter(PerplexityFilter.Params(keep_fraction=0.5)).fit(
            SelectionContext(stage="ppl", seed=0, references=[ReferenceModel("m", world["trained"])]))
    with pytest.raises(SelectionError, match="reference"):
        fitted(world, [])
    with pytest.raises(ValueError, match="fit"):
        PerplexityFilter(PerplexityFilter.Params(keep_fraction=0.5)).score(world["pool"])
    with pytest.raises(ValidationError, match="max_tokens"):
        PerplexityFilter.Params(keep_fraction=0.5, max_tokens=0)
    with pytest.raises(ValidationError, match="batch_size"):
        PerplexityFilter.Params(keep_fraction=0.5, batch_size=0)
    with pytest.raises(ValidationError, match="exactly one"):
        PerplexityFilter.Params()
