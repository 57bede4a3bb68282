import numpy as np
import pytest
from pydantic import ValidationError

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.domain_mix import DomainMix
from components.data.tokenizer import document_token_counts
from components.data.registry import SELECTORS
from components.data.schema import validate_documents
from components.data.selector import SelectionContext, SelectionError

PROSE = "the parser reads every line of the file and builds a small tree of nodes"
CODE = "def add(a, b):\n    return a + b"
ARITH = "12+34=46\n7-5=2"


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=300, seq_len=64)).train([PROSE, CODE, ARITH] * 5)


@pytest.fixture
def docs(make_docs):
    rng = np.random.default_rng(0)
    texts, domains = [], []
    for domain, base, n in (("prose", PROSE, 120), ("code", CODE, 120), ("arithmetic", ARITH, 120)):
        for i in range(n):  # varied lengths, distinct texts
            texts.append(" ".join([base] * int(rng.integers(1, 4))) + f" {domain}{i}")
            domains.append(domain)
    return make_docs(texts, domain=domains).drop(columns="noise_label")


def ctx(tokenizer):
    return SelectionContext(stage="stage mix (domain_mix)", seed=0, tokenizer=tokenizer)


def test_mix_hits_the_token_shares_and_budget(docs, tokenizer):
    weights = {"prose": 0.5, "code": 0.3, "arithmetic": 0.2}
    mix = DomainMix(DomainMix.Params(weights=weights, budget_tokens=3000, seed=1))
    out = mix.transform(docs, ctx(tokenizer))
    validate_documents(out.assign(noise_label=""), "domain_mix output")
    tokens = document_token_counts(tokenizer, out["text"])
    pool_tokens = document_token_counts(tokenizer, docs["text"])
    for domain, weight in weights.items():
        got = tokens[out["domain"].to_numpy() == domain].sum()
        # first fit, then the best closing document: off by at most half the domain's shortest document
        assert abs(got - weight * 3000) <= pool_tokens[docs["domain"].to_numpy() == domain].min() / 2
        assert mix.facts[f"mix_share_{domain}"] == pytest.approx(got / tokens.sum())
        assert mix.facts[f"mix_share_{domain}"] == pytest.approx(weight, abs=0.01)
    assert mix.facts["mix_tokens"] == tokens.sum()
    # seeded: same seed, same docs; another seed, another sample
    assert mix.transform(docs, ctx(tokenizer))["id"].tolist() == out["id"].tolist()
    other = DomainMix(DomainMix.Params(weights=weights, budget_tokens=3000, seed=2)).transform(docs, ctx(tokenizer))
    assert other["id"].tolist() != out["id"].tolist()


def test_unlisted_domains_are_left_out_and_normalize_weights(docs, tokenizer):
    mix = DomainMix(DomainMix.Params(weights={"prose": 2, "code": 2}, budget_tokens=1000, normalize_weights=True))
    out = mix.transform(docs, ctx(tokenizer))
    assert set(out["domain"]) == {"prose", "code"}
    assert mix.facts["mix_target_share_prose"] == 0.5


def test_errors_name_the_domain(docs, tokenizer):
    with pytest.raises(SelectionError, match=r"\['math'\] that are not in the training docs; present domains: "
                                             r"arithmetic, code, prose"):
        DomainMix(DomainMix.Params(weights={"math": 1.0}, budget_tokens=100)).transform(docs, ctx(tokenizer))
    available = document_token_counts(tokenizer, docs[docs["domain"] == "code"]["text"]).sum()
    with pytest.raises(SelectionError, match=rf"domain 'code' has {available} tokens .* asks for 100000"):
        DomainMix(DomainMix.Params(weights={"prose": 0.5, "code": 0.5}, budget_tokens=200_000)).transform(
            docs, ctx(tokenizer))
    with pytest.raises(SelectionError, match="tokenizer"):
        DomainMix(DomainMix.Params(weights={"prose": 1.0}, budget_tokens=100)).transform(
            docs, SelectionContext(stage="s", seed=0))


def test_weight_validation():
    with pytest.raises(ValidationError, match=r"weights must be > 0; got \{'code': 0.0\}"):
        DomainMix.Params(weights={"prose": 1.0, "code": 0.0}, budget_tokens=10)
    with pytest.raises(ValidationError, match="sum to 0.9, not 1.*normalize_weights"):
        DomainMix.Params(weights={"prose": 0.6, "code": 0.3}, budget_tokens=10)
    with pytest.raises(ValidationError):
        DomainMix.Params(weights={}, budget_tokens=10)
    assert SELECTORS.get("domain_mix") is DomainMix and DomainMix.needs_tokenizer


def test_a_long_document_is_skipped_rather_than_overshooting(make_docs, tokenizer):
    long_doc = " ".join([PROSE] * 40)
    docs = make_docs([long_doc] + [f"{PROSE} {i}" for i in range(30)]).drop(columns="noise_label")
    tokens = document_token_counts(tokenizer, docs["text"])
    budget = int(tokens[1:6].sum())  # about five short docs, far less than the long one
    for seed in range(5):
        mix = DomainMix(DomainMix.Params(weights={"prose": 1.0}, budget_tokens=budget, seed=seed))
        out = mix.transform(docs, ctx(tokenizer))
        assert "doc-0000" not in set(out["id"])
        assert abs(mix.facts["mix_tokens"] - budget) <= tokens[1:].max() // 2
