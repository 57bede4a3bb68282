"""Infilling from test blocks: seeded examples, and middle-span scores in both formats equal to
a direct forward pass of each example."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.denoising import DenoisingTokens
from components.eval.infilling import InfillSpec, infill_examples, infill_metrics
from components.eval.standard import StandardEvaluation
from components.model.presets import build_model

TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times\n" for i in range(150)] + \
        [f"def f(x):\n    return x + {i}\n" for i in range(150)]


@pytest.fixture(scope="module")
def setup():
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=48)).train(TEXTS)
    ids = {d: np.array(tokenizer("".join(t))["input_ids"]) for d, t in (("prose", TEXTS[:150]), ("code", TEXTS[150:]))}
    blocks = {d: v[: len(v) // 48 * 48].reshape(-1, 48)[:5] for d, v in ids.items()}
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=128, seed=0).eval()
    return tokenizer, blocks, model


def test_examples_are_seeded_cuts_of_the_test_blocks(setup):
    _, blocks, _ = setup
    spec = InfillSpec(examples_per_domain=7, middle_tokens=4, context_tokens=10)
    examples = infill_examples(spec, blocks)
    assert sorted(examples) == ["code", "prose"] and all(len(v) == 7 for v in examples.values())
    for domain, items in examples.items():
        for i, (prefix, middle, suffix) in enumerate(items):
            assert (len(prefix), len(middle), len(suffix)) == (10, 4, 10)
            joined = np.concatenate([prefix, middle, suffix])
            row = blocks[domain][i % 5]
            assert any(np.array_equal(row[s:s + 24], joined) for s in range(48 - 24 + 1))
    again = infill_examples(spec, blocks)
    assert all(np.array_equal(a, b) for d in examples for x, y in zip(examples[d], again[d]) for a, b in zip(x, y))


def test_scores_equal_a_direct_forward_of_each_example(setup):
    tokenizer, blocks, model = setup
    spec = InfillSpec(examples_per_domain=3, middle_tokens=4, context_tokens=8, domains=["code"])
    m = infill_metrics(model, tokenizer, spec, blocks, batch_size=2)
    tokens = DenoisingTokens.from_tokenizer(tokenizer)
    s0, x = tokens.sentinels[0], tokens.modes["X"]
    pre, suf, mid = tokens.fim["PRE"], tokens.fim["SUF"], tokens.fim["MID"]
    expected = {"prefix": [], "sentinel": [], "fim": []}
    hits = {"prefix": 0, "sentinel": 0, "fim": 0}
    with torch.no_grad():
        for prefix, middle, suffix in infill_examples(spec, blocks)["code"]:
            for f, context in (("prefix", list(prefix)), ("sentinel", [x, *prefix, s0, *suffix, s0]),
                               ("fim", [pre, *prefix, suf, *suffix, mid])):
                ids = torch.tensor([context + list(middle)])
                logits = model(input_ids=ids).logits[0, len(context) - 1:-1]
                expected[f].append(F.cross_entropy(logits, torch.tensor(middle), reduction="sum").item())
                hits[f] += int((logits.argmax(-1) == torch.tensor(middle)).sum())
    assert "hlp_mae" not in m  # no horizon head beside this model
    for f in ("prefix", "sentinel", "fim"):
        assert m[f"infill_nll_{f}"] == pytest.approx(sum(expected[f]) / 12, rel=1e-5)
        assert m[f"infill_nll_{f}_code"] == m[f"infill_nll_{f}"]
        assert m[f"infill_acc_{f}"] == hits[f] / 12  # 3 examples x 4 middle tokens
    assert m["infill_nll_prefix"] != m["infill_nll_sentinel"]


def test_a_horizon_head_beside_the_model_is_scored_against_the_true_remaining_share(setup, tmp_path):
    from safetensors.torch import save_file

    tokenizer, blocks, model = setup
    spec = InfillSpec(examples_per_domain=3, middle_tokens=4, context_tokens=8, domains=["code"])
    head = torch.nn.Linear(model.config.hidden_size, 1)
    save_file({"horizon_head.weight": head.weight.detach(), "horizon_head.bias": head.bias.detach()},
              str(tmp_path / "auxiliary.safetensors"))
    m = infill_metrics(model, tokenizer, spec, blocks, model_dir=tmp_path)
    tokens = DenoisingTokens.from_tokenizer(tokenizer)
    truth = np.array([1.0, 0.75, 0.5, 0.25])
    errors = []
    with torch.no_grad():
        for prefix, middle, suffix in infill_examples(spec, blocks)["code"]:
            context = [tokens.fim["PRE"], *prefix, tokens.fim["SUF"], *suffix, tokens.fim["MID"]]
            hidden = model(input_ids=torch.tensor([context + list(middle)]), output_hidden_states=True).hidden_states[-1]
            predicted = torch.sigmoid(head(hidden[0, len(context) - 1:-1]).squeeze(-1)).numpy()
            errors.append(np.abs(predicted - truth).mean())
    assert m["hlp_mae"] == pytest.approx(float(np.mean(errors)), rel=1e-5)
    assert m["hlp_mae_constant"] == pytest.approx(0.25)  # |0.625 - truth| averages 0.25


def test_bad_specs_are_named(setup):
    _, blocks, _ = setup
    with pytest.raises(ValueError, match="infill.domains names 'math'"):
        infill_examples(InfillSpec(domains=["math"]), blocks)
    with pytest.raises(ValueError, match="at least 2 x context_tokens \\+ middle_tokens = 72 tokens"):
        infill_examples(InfillSpec(), blocks)
    params = StandardEvaluation.Params.model_validate({"infill": {"middle_tokens": 4}})
    assert params.infill.context_tokens == 32
    with pytest.raises(ValidationError, match=r"middle_tokens\n  Input should be greater than"):
        StandardEvaluation.Params.model_validate({"infill": {"middle_tokens": 0}})
