"""Text generators (rule-based restyler, model generator on a nano LM) and the WRAP transform."""
import re

import numpy as np
import pandas as pd
import pytest

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.generators import (GENERATORS, PROMPT_TEMPLATES, GenerationError, GenerationParams,
                                        ModelGenerator, make_generator, restyle_qa, restyle_simple,
                                        restyle_wikipedia, sentence_spans, split_sentences)
from components.data.registry import SELECTORS
from components.data.schema import validate_documents
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.data.wrap import Wrap, chosen_chunks, sentence_chunks
from components.model.presets import build_model

PROSE = ("The list is a mutable sequence. It can hold objects of any type (including other lists); it grows "
         "as needed, and elements are read by index. A tuple is immutable. Tuples are hashable when their "
         "items are hashable.\n\n"
         "Dictionaries map keys to values. Each key must be hashable. The order of insertion is kept, which "
         "makes iteration predictable. Sets store unique items!")
MARKUP = ("Title\n=====\n\n* The **print** function writes text.\n* See `sys.stdout` and "
          "[the docs](https://docs.python.org).\n\n<b>Note</b>::\n\n   Output   is   buffered.")


def _docs(texts, domain="prose", split="train"):
    n = len(texts)
    return pd.DataFrame({"id": [f"doc{i}" for i in range(n)], "text": texts, "domain": [domain] * n,
                         "source": ["pydoc"] * n, "split": [split] * n})


CTX = SelectionContext(stage="stage wrap (wrap)", seed=0)


@pytest.fixture(scope="module")
def lm():
    texts = [PROSE, MARKUP] * 10 + [PROMPT_TEMPLATES["qa"]]
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=512)).train(texts)
    model = build_model("nano", len(tokenizer), 512, seed=0).eval()
    return tokenizer, model


def _lm_context(lm, **kw):
    tokenizer, model = lm
    return SelectionContext(stage="stage wrap (wrap)", seed=0, tokenizer=tokenizer,
                            references=[ReferenceModel("pretrain", model)], **kw)


# ---- sentence splitting and the restyler -----------------------------------------------------

def test_sentences_are_spans():
    spans = sentence_spans(PROSE)
    assert len(spans) == 8
    assert split_sentences(PROSE)[3] == "Tuples are hashable when their items are hashable."
    assert all(PROSE[a:b].strip() == PROSE[a:b] for a, b in spans)


def test_restyle_is_deterministic():
    for restyle in (restyle_qa, restyle_wikipedia, restyle_simple):
        assert restyle(PROSE) == restyle(PROSE) and restyle(MARKUP) == restyle(MARKUP)


def test_restyle_qa_format():
    out = restyle_qa(PROSE)
    pairs = out.split("\n\n")
    assert len(pairs) == len(split_sentences(PROSE))
    for pair in pairs:
        question, answer = pair.split("\n")
        assert re.fullmatch(r"Question: \S.*\?", question), question
        assert re.fullmatch(r"Answer: \S.*[.!?]", answer), answer
    assert pairs[0] == "Question: Is the list a mutable sequence?\nAnswer: Yes. The list is a mutable sequence."
    assert pairs[5].startswith("Question: Must each key be hashable?")
    assert pairs[4].startswith("Question: What does the passage say about Dictionaries map keys to values")


def test_restyle_wikipedia_strips_markup():
    out = restyle_wikipedia(MARKUP)
    assert not re.search(r"[*`<>\[\]]|::|===|https?:", out), out
    assert "  " not in out and "The print function writes text." in out
    assert "See sys.stdout and the docs." in out and "Output is buffered." in out
    for paragraph in out.split("\n\n"):
        assert paragraph[0].isupper() and paragraph.endswith(".")


def test_restyle_simple_shortens():
    out = restyle_simple(PROSE)
    sentences = split_sentences(out)
    assert len(sentences) > len(split_sentences(PROSE))
    assert max(len(s.split()) for s in sentences) <= 12
    assert "(" not in out and "It grows as needed." in out and "Elements are read by index." in out


# ---- generator params and the model generator -------------------------------------------------

def test_generator_params_errors():
    with pytest.raises(ValueError, match="no style 'poetic'"):
        GenerationParams(style="poetic")
    with pytest.raises(ValueError, match="generator 'restyle' has no style 'hard'"):
        GenerationParams(style="hard")
    with pytest.raises(ValueError, match="unknown generator 'gpt4'.*model, restyle"):
        GenerationParams(generator="gpt4")
    with pytest.raises(ValueError, match="must contain '{text}'"):
        GenerationParams(generator="model", prompt_template="no slot")
    assert GENERATORS.keys() == ["model", "restyle"]


def test_model_generator_needs_a_reference_and_tokenizer(lm):
    params = GenerationParams(generator="model", style="qa")
    with pytest.raises(SelectionError, match="needs a model: give the stage a `reference` input"):
        make_generator(params, CTX)
    with pytest.raises(GenerationError, match="needs the `tokenizer` input"):
        make_generator(params, SelectionContext(stage="s", seed=0, references=[ReferenceModel("m", lm[1])]))
    with pytest.raises(GenerationError, match="no room for source text"):
        make_generator(params.model_copy(update={"max_new_tokens": 600}), _lm_context(lm))


def test_model_generator_end_to_end(lm):
    prompts = split_sentences(PROSE)[:5]
    greedy = GenerationParams(generator="model", style="qa", max_new_tokens=12, batch_size=2)
    gen = make_generator(greedy, _lm_context(lm))
    assert isinstance(gen, ModelGenerator)
    ids = gen.prompt_ids(prompts[0])
    assert len(ids) > 100  # the WRAP chat template wraps the text
    out = gen.generate(prompts)
    assert len(out) == 5 and all(o.strip() for o in out)
    assert gen.generate(prompts) == out  # greedy: deterministic
    sampled = greedy.model_copy(update={"do_sample": True, "seed": 1})
    a = make_generator(sampled, _lm_context(lm)).generate(prompts)
    assert make_generator(sampled, _lm_context(lm)).generate(prompts) == a  # seeded sampling repeats
    b = make_generator(sampled.model_copy(update={"seed": 2}), _lm_context(lm)).generate(prompts)
    assert a != b and a != out
    # the global RNG is left alone
    import torch
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    make_generator(sampled, _lm_context(lm)).generate(prompts[:1])
    assert torch.equal(torch.rand(1), before)


def test_model_generator_truncates_long_text(lm):
    params = GenerationParams(generator="model", style="continue", max_new_tokens=4, max_input_tokens=8)
    gen = make_generator(params, _lm_context(lm))
    tokens = lm[0].backend_tokenizer.encode(PROSE, add_special_tokens=False).ids
    assert gen.prompt_ids(PROSE) == tokens[-8:]  # continuation keeps the end of the text
    assert gen.stats["truncated_prompts"] == 1


# ---- the transform ------------------------------------------------------------------------------

def test_sentence_chunks():
    chunks = sentence_chunks(PROSE, 20)
    assert all(c in PROSE for c in chunks)
    assert " ".join(" ".join(c.split()) for c in chunks) == " ".join(PROSE.split())  # nothing lost
    assert all(len(c.split()) <= 20 for c in chunks)
    assert sentence_chunks("one two three four five. Six", 2) == ["one two three four five.", "Six"]


def test_wrap_emits_real_and_synthetic_one_to_one():
    docs = _docs([PROSE, MARKUP, "A short note. It ends here."])
    wrap = Wrap(Wrap.Params(style="qa", chunk_size=25))
    out = wrap.transform(docs, CTX)
    real, synthetic = out.iloc[:3], out.iloc[3:]
    pd.testing.assert_frame_equal(real, docs)
    n_chunks = sum(len(sentence_chunks(t, 25)) for t in docs["text"])
    assert len(synthetic) == n_chunks == wrap.facts["wrap_chunks_rephrased"] > 3
    assert out["id"].is_unique
    assert synthetic["id"].str.fullmatch(r"doc\d#wrap-qa-\d+").all()
    assert synthetic["id"].iloc[0] == "doc0#wrap-qa-0"
    assert (synthetic["source"] == "wrap:qa:restyle").all()
    assert (synthetic["domain"] == "prose").all() and (synthetic["split"] == "train").all()
    assert synthetic["text"].str.startswith("Question: ").all()
    assert 0.5 < wrap.facts["wrap_synthetic_per_real_word"] < 3
    validate_documents(out.assign(noise_label=""), "wrap output")


def test_wrap_ratio_is_a_seeded_subset():
    docs = _docs([PROSE] * 6)
    docs["id"] = [f"p{i}" for i in range(6)]
    full = Wrap(Wrap.Params(style="simple", chunk_size=20)).transform(docs, CTX)
    half = Wrap(Wrap.Params(style="simple", chunk_size=20, synthetic_ratio=0.5, seed=3)).transform(docs, CTX)
    n_full = len(full) - 6
    assert len(half) - 6 == round(0.5 * n_full)
    assert set(half["id"]) < set(full["id"])
    shuffled = Wrap(Wrap.Params(style="simple", chunk_size=20, synthetic_ratio=0.5, seed=3)).transform(
        docs.iloc[::-1].reset_index(drop=True), CTX)
    assert set(shuffled["id"]) == set(half["id"])  # the choice does not depend on the table order
    other = Wrap(Wrap.Params(style="simple", chunk_size=20, synthetic_ratio=0.5, seed=4)).transform(docs, CTX)
    assert set(other["id"]) != set(half["id"])
    keys = [("a", k) for k in range(10)]
    assert chosen_chunks(keys, 0.3, 0).sum() == 3 and chosen_chunks(keys, 1.0, 0).all()


def test_wrap_domains_and_token_chunks(lm):
    docs = pd.concat([_docs([PROSE]), _docs(["x = 1\ny = 2\n"], domain="code").assign(id="c0")], ignore_index=True)
    out = Wrap(Wrap.Params(style="wikipedia", domains=["prose"], chunk_size=30, chunk_unit="tokens")).transform(
        docs, _lm_context(lm))
    assert not out["id"].str.startswith("c0#").any() and out["id"].str.startswith("doc0#wrap-wikipedia-").any()
    with pytest.raises(SelectionError, match="chunk_unit='tokens' needs the `tokenizer` input"):
        Wrap(Wrap.Params(chunk_unit="tokens")).transform(docs, CTX)
    with pytest.raises(SelectionError, match=r"domains=\['web'\] not among.*code, prose"):
        Wrap(Wrap.Params(domains=["web"])).transform(docs, CTX)


def test_wrap_with_the_model_generator(lm):
    docs = _docs([PROSE])
    wrap = Wrap(Wrap.Params(generator="model", style="hard", chunk_size=40, max_new_tokens=8))
    out = wrap.transform(docs, _lm_context(lm))
    synthetic = out.iloc[1:]
    assert len(synthetic) == len(sentence_chunks(PROSE, 40)) and synthetic["text"].str.strip().str.len().gt(0).all()
    assert (synthetic["source"] == "wrap:hard:model").all()
    with pytest.raises(SelectionError, match="needs a model"):
        Wrap(Wrap.Params(generator="model", style="hard")).transform(docs, CTX)


def test_wrap_errors_name_the_document():
    docs = _docs([PROSE, "-----\n=====\n"])
    with pytest.raises(GenerationError, match=r"returned empty text for chunk 0 of document 'doc1'"):
        Wrap(Wrap.Params(style="wikipedia")).transform(docs, CTX)
    with pytest.raises(ValueError, match="no style 'poetic'"):
        Wrap.Params(style="poetic")
    with pytest.raises(ValueError, match="synthetic_ratio"):
        Wrap.Params(synthetic_ratio=1.5)
    twice = Wrap(Wrap.Params(style="qa")).transform(_docs([PROSE]), CTX)
    with pytest.raises(SelectionError, match="already exist"):
        Wrap(Wrap.Params(style="qa")).transform(twice, CTX)


def test_registered():
    assert SELECTORS.get("wrap") is Wrap and "2401.16380" in Wrap.paper.url
    assert np.isclose(Wrap().params.synthetic_ratio, 1.0)
