"""Non-instructional fine-tuning data: (first half, continuation) documents."""
import pandas as pd
import pytest

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.continuation import Continuation, fill_template, first_half
from components.data.generators import GenerationError, restyle_simple
from components.data.registry import SELECTORS
from components.data.schema import validate_documents
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.model.presets import build_model

TEXTS = ["The list is a mutable sequence. It grows as needed and items are read by index, starting at zero.",
         "Dictionaries map {response} keys to values. Iteration follows the insertion order of the keys.",
         "Too short to split."]
CTX = SelectionContext(stage="stage sft (continuation)", seed=0)


def _docs(texts=TEXTS):
    n = len(texts)
    return pd.DataFrame({"id": [f"d{i}" for i in range(n)], "text": texts, "domain": ["prose"] * n,
                         "source": ["pydoc"] * n, "split": ["train"] * n})


def test_first_half_and_template():
    assert first_half("a b c d e") == "a b"
    assert first_half("one  two\nthree four") == "one  two"
    assert first_half("single") == ""
    assert fill_template("Q: {instruction}|A: {response}", "{response}", "ok") == "Q: {response}|A: ok"


def test_continuation_format():
    cont = Continuation(Continuation.Params(template="<s>{instruction}\n### {response}</s>"))
    out = cont.transform(_docs(), CTX)
    assert out["id"].tolist() == ["d0#cont", "d1#cont"]  # by default only the fine-tuning documents
    assert cont.params.style == "simple" and cont.stats["short_docs_skipped"] == 1
    assert (out["source"] == "continuation:simple:restyle").all()
    assert (out["domain"] == "prose").all() and (out["split"] == "train").all()
    for text, original in zip(out["text"], TEXTS):
        instruction, response = text[len("<s>"):-len("</s>")].split("\n### ")
        assert instruction == first_half(original) and original.startswith(instruction)
        assert response == restyle_simple(instruction)
    assert out["text"].iloc[1].startswith("<s>Dictionaries map {response} keys")  # braces in text stay literal
    validate_documents(out.assign(noise_label=""), "continuation output")


def test_keep_original_and_domains():
    docs = pd.concat([_docs(), _docs(["x = 1 + 2 + 3 + 4 + 5 + 6 + 7"]).assign(id="c0", domain="code")],
                     ignore_index=True)
    out = Continuation(Continuation.Params(keep_original=True, domains=["prose"])).transform(docs, CTX)
    assert out["id"].tolist() == ["d0", "d1", "d2", "c0", "d0#cont", "d1#cont"]
    only = Continuation(Continuation.Params(domains=["prose"])).transform(docs, CTX)
    assert only["id"].tolist() == ["c0", "d0#cont", "d1#cont"]  # other domains pass through


def test_model_generator_continues_the_text():
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=300, seq_len=128)).train(TEXTS * 5)
    model = build_model("nano", len(tokenizer), 128, seed=0).eval()
    ctx = SelectionContext(stage="s", seed=0, tokenizer=tokenizer, references=[ReferenceModel("pretrain", model)])
    cont = Continuation(Continuation.Params(generator="model", max_new_tokens=6, do_sample=True, seed=0))
    assert cont.params.style == "continue"
    out = cont.transform(_docs(), ctx)
    again = Continuation(Continuation.Params(generator="model", max_new_tokens=6, do_sample=True, seed=0))
    pd.testing.assert_frame_equal(out, again.transform(_docs(), ctx))
    assert (out["source"] == "continuation:continue:model").all()
    for text, original in zip(out["text"], TEXTS):
        assert text.startswith(f"User: {first_half(original)}\nAssistant: ")
        assert text.split("\nAssistant: ", 1)[1].strip()
    with pytest.raises(SelectionError, match="needs a model"):
        Continuation(Continuation.Params(generator="model")).transform(_docs(), CTX)


def test_errors():
    with pytest.raises(ValueError, match=r"template must contain \{response\}"):
        Continuation.Params(template="{instruction} only")
    with pytest.raises(ValueError, match="generator 'restyle' has no style 'continue'"):
        Continuation.Params(style="continue")
    with pytest.raises(ValueError, match="no style 'haiku'"):
        Continuation.Params(generator="model", style="haiku")
    with pytest.raises(SelectionError, match="min_words=50"):
        Continuation(Continuation.Params(min_words=50)).transform(_docs(), CTX)
    with pytest.raises(GenerationError, match="empty text for document 'd0'"):
        Continuation(Continuation.Params(style="wikipedia")).transform(_docs(["---- ---- ---- ==== ==== ===== ---- ===="]), CTX)


def test_registered():
    assert SELECTORS.get("continuation") is Continuation and "2409.00096" in Continuation.paper.url
