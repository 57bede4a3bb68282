"""EFT: beta=0 is the large base, identical small models cancel, rows normalize, vocab checks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ["HF_HUB_OFFLINE"] = "1"

from components.distill.eft import EftModel  # noqa: E402
from components.eval.perplexity import evaluate_perplexity  # noqa: E402
from tests.components.distill._helpers import nano, pattern_blocks  # noqa: E402

BATCH = torch.from_numpy(pattern_blocks()[:3].astype(np.int64))


def large():
    return nano(seed=1, hidden_size=96, num_hidden_layers=3)


def base_log_probs(model):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=BATCH).logits, -1)


def test_beta_zero_and_identical_small_models_give_the_large_base():
    big = large()
    expected = base_log_probs(big)
    with torch.no_grad():
        zero = EftModel(big, nano(seed=2), nano(seed=3), beta=0.0)(BATCH).logits
        same = EftModel(big, nano(seed=2), nano(seed=2), beta=1.5)(BATCH).logits
    assert torch.allclose(zero, expected, atol=1e-5)
    assert torch.allclose(same, expected, atol=1e-5)


def test_formula_and_normalization():
    big, ft, base = large(), nano(seed=2), nano(seed=3)
    with torch.no_grad():
        out = EftModel(big, ft, base, beta=0.7)(BATCH).logits
    raw = base_log_probs(big) + 0.7 * (base_log_probs(ft) - base_log_probs(base))
    assert torch.allclose(out, F.log_softmax(raw, -1), atol=1e-5)
    sums = out.exp().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


def test_perplexity_and_generate():
    eft = EftModel(large(), nano(seed=2), nano(seed=3))
    result = evaluate_perplexity(eft, pattern_blocks(8), batch_size=4)
    assert result["tokens"] == 8 * 15 and np.isfinite(result["loss"])
    out = eft.generate(input_ids=BATCH[:, :4], max_length=7)
    assert out.shape == (3, 7) and torch.equal(out[:, :4], BATCH[:, :4])
    with torch.no_grad():  # greedy: the first new token is the argmax of the EFT distribution
        assert torch.equal(out[:, 4], eft(BATCH[:, :4]).logits[:, -1].argmax(-1))
    assert eft.device == torch.device("cpu") and eft.config.hidden_size == 96


def test_vocab_mismatch_names_the_model():
    with pytest.raises(ValueError, match="small_base differ from large_base"):
        EftModel(large(), nano(seed=2), nano(seed=3, vocab=32))

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    good, bad = Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0})
    with pytest.raises(ValueError, match="tokenizer of small_ft differs"):
        EftModel(large(), nano(seed=2), nano(seed=3), tokenizers=[good, bad, good])


def test_the_standard_evaluator_scores_the_ensemble(tmp_path):
    """The evaluate stage scores EFT with the standard evaluator, whose attention probes read
    ``model.model.layers``: the ensemble has none, so it is scored without them (it crashed there).
    A recipe's ``attention_kl_maps`` (which swap one model's attention) are dropped for it alone."""
    from components.eval.evaluators import EVALUATORS
    from tasks.evaluate import _without_attention_probes

    standard = EVALUATORS.get("standard")
    probing = standard(standard.Params(attention_kl_maps=("elu",)))
    eft = EftModel(large(), nano(seed=2), nano(seed=3))
    scores = _without_attention_probes(probing).evaluate(eft, None, None, {"pattern": pattern_blocks(8)}, [], tmp_path)
    assert np.isfinite(scores["ppl_pattern"]) and scores["ppl_all"] == scores["ppl_pattern"]
    assert not any(key.startswith("attention_kl") for key in scores)
    assert probing.params.attention_kl_maps == ("elu",)  # the members are still probed
    member = probing.evaluate(nano(seed=2), None, None, {"pattern": pattern_blocks(8)}, [], tmp_path)
    assert np.isfinite(member["attention_kl_elu"])
