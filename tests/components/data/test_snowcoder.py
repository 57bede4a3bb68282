"""Arctic-SnowCoder's quality head: separation, chunk-mean vs whole-document scoring, purity, errors."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.registry import SELECTORS
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.data.snowcoder import SnowCoder, pick_positions
from components.model.presets import build_model

FILLER = ("the of and to in is for on with as by at from this that are be or an it was have can "
          "value list table page item note data line word part text small large first last other").split()
GOOD_END = "def checked(value): return sorted(value)  # tested, typed and documented helper"
BAD_END = "CLICK HERE!!! buy cheap pills now, free casino bonus, www dot spam dot biz"
CODE = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
        "for i in range(10):\n    print(i * i)\n", "import os\npath = os.path.join(root, name)\n",
        "def mean(xs):\n    return sum(xs) / len(xs)\n", "with open(path) as f:\n    data = f.read()\n"]
SPAM = ["BUY NOW!!! cheap pills best price click here", "free casino bonus $$$ win win win click",
        "hot singles in your area call now 555", "limited offer!!! act fast subscribe today",
        "lose weight fast with this one trick!!!", "you have won a prize claim your reward now"]


def _frame(texts, prefix):
    n = len(texts)
    return pd.DataFrame({"id": [f"{prefix}-{i}" for i in range(n)], "text": texts, "domain": ["code"] * n,
                         "source": ["test"] * n, "split": ["train"] * n})


def _cue_docs(n, end, seed, words=70):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(FILLER, words)) + ". " + end for _ in range(n)]


def _varied(base, n, seed):
    rng = np.random.default_rng(seed)
    return [f"{base[i % len(base)]}\n# {' '.join(rng.choice(FILLER, 4))}" for i in range(n)]


@pytest.fixture(scope="module")
def lm():
    texts = _cue_docs(40, GOOD_END, 0) + _cue_docs(40, BAD_END, 1) + CODE * 5 + SPAM * 5
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=256)).train(texts)
    model = build_model("nano", len(tokenizer), 256, seed=0).eval()
    return tokenizer, model


def _context(lm, target, pool, **kw):
    tokenizer, model = lm
    return SelectionContext(stage="stage test (snowcoder)", seed=0, target=target, tokenizer=tokenizer,
                            references=[ReferenceModel("pretrain", model)], pool_sample=pool, **kw)


def _fitted(lm, target_texts, pool_texts, **params):
    selector = SnowCoder(SnowCoder.Params(keep_fraction=0.5, **params))
    selector.fit(_context(lm, _frame(target_texts, "t"), _frame(pool_texts, "p")))
    return selector


def test_pick_positions():
    assert pick_positions(0) == [] and pick_positions(1) == [0] and pick_positions(2) == [0, 1]
    assert pick_positions(3) == [0, 1, 2] and pick_positions(10) == [0, 5, 9]


@pytest.mark.parametrize("chunking", ["tokens", "lines"])
def test_head_separates_code_from_spam(lm, chunking):
    selector = _fitted(lm, _varied(CODE, 24, 0), _varied(SPAM, 24, 1), chunking=chunking, chunk_tokens=16,
                       chunk_lines=1)
    facts = selector.facts
    assert facts["head_positives"] == 24 and facts["head_negatives"] == 24
    assert facts["head_accuracy_holdout"] >= 0.9 and facts["head_accuracy_all"] >= 0.95
    new = _frame(_varied(CODE, 12, 7) + _varied(SPAM, 12, 8), "n")
    scores = selector.scores(new)
    assert roc_auc_score([1] * 12 + [0] * 12, scores) >= 0.95
    assert ((scores >= 0) & (scores <= 1)).all()
    # keep_fraction without the stage: the top half by score is the code
    assert selector.keep_mask(new)[:12].mean() >= 0.9


def test_chunk_mean_finds_quality_cue_in_the_last_chunk(lm):
    """The cue is at the end of long documents: only the bottom chunk sees it. The whole-document
    ablation embeds the first ``chunk_tokens`` tokens (the embedder's context) and cannot."""
    target, pool = _cue_docs(30, GOOD_END, 10), _cue_docs(30, BAD_END, 11)
    test = _frame(_cue_docs(30, GOOD_END, 12) + _cue_docs(30, BAD_END, 13), "x")
    truth = [1] * 30 + [0] * 30
    chunked = _fitted(lm, target, pool, chunking="tokens", chunk_tokens=24, head_c=0.01)
    whole = _fitted(lm, target, pool, chunking="none", chunk_tokens=24, head_c=0.01)
    assert chunked.facts["head_chunks_per_doc"] == 3
    assert whole.facts["head_chunks_per_doc"] == 1
    auc_chunked = roc_auc_score(truth, chunked.scores(test))
    auc_whole = roc_auc_score(truth, whole.scores(test))
    assert auc_chunked >= 0.95, auc_chunked
    assert auc_whole <= 0.8, auc_whole  # chance level: the cue is beyond the embedder's context
    assert chunked.facts["head_accuracy_holdout"] >= 0.9
    assert whole.facts["head_accuracy_holdout"] <= 0.7


def test_chunks_are_spans_of_the_text(lm):
    selector = _fitted(lm, _varied(CODE, 6, 0), _varied(SPAM, 6, 1), chunk_tokens=8)
    text = _cue_docs(1, GOOD_END, 3)[0]
    top, middle, bottom = selector.chunks([text])[0]
    assert text.startswith(top) and text.endswith(bottom) and middle in text
    assert GOOD_END.split()[-1] in bottom
    capped = _fitted(lm, _varied(CODE, 4, 0), _varied(SPAM, 4, 1), chunk_tokens=1000)
    assert capped.facts["head_chunk_tokens"] == 255  # the nano model's 256 positions, less the EOS marker


def test_score_is_per_document(lm):
    selector = _fitted(lm, _varied(CODE, 8, 0), _varied(SPAM, 8, 1), chunk_tokens=8)
    docs = _frame(_varied(CODE, 5, 3) + _varied(SPAM, 5, 4), "d")
    together = selector.scores(docs)
    alone = np.concatenate([selector.scores(docs.iloc[[i]]) for i in range(len(docs))])
    reversed_ = selector.scores(docs.iloc[::-1])[::-1]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together, reversed_, atol=1e-5)


def test_seeded_fit_is_reproducible(lm):
    a = _fitted(lm, _varied(CODE, 10, 0), _varied(SPAM, 10, 1), chunk_tokens=8, seed=3)
    b = _fitted(lm, _varied(CODE, 10, 0), _varied(SPAM, 10, 1), chunk_tokens=8, seed=3)
    assert a.facts == b.facts
    docs = _frame(_varied(CODE, 3, 5), "d")
    np.testing.assert_array_equal(a.scores(docs), b.scores(docs))


def test_errors(lm):
    tokenizer, model = lm
    selector = SnowCoder(SnowCoder.Params(keep_fraction=0.5))
    target, pool = _frame(CODE, "t"), _frame(SPAM, "p")
    with pytest.raises(SelectionError, match="needs a model"):
        selector.fit(SelectionContext(stage="s", seed=0, target=target, tokenizer=tokenizer, pool_sample=pool))
    with pytest.raises(SelectionError, match="reference='other' is not among"):
        SnowCoder(SnowCoder.Params(keep_fraction=0.5, reference="other")).fit(_context(lm, target, pool))
    with pytest.raises(SelectionError, match="target set"):
        selector.fit(_context(lm, target.iloc[:0], pool))
    with pytest.raises(SelectionError, match="at least 2 negative"):
        selector.fit(_context(lm, target, pd.concat([target, pool.iloc[:1]])))  # positives are no negatives
    with pytest.raises(RuntimeError, match="fit"):
        SnowCoder(SnowCoder.Params(keep_fraction=0.5)).score(target)
    with pytest.raises(ValueError, match="chunking"):
        SnowCoder.Params(keep_fraction=0.5, chunking="paragraphs")


def test_registered_with_its_needs():
    cls = SELECTORS.get("snowcoder")
    assert cls is SnowCoder and cls.needs_target and cls.needs_tokenizer and cls.min_references == 1
    assert "2409.02326" in cls.paper.url
