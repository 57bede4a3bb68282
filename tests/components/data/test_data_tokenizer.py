import numpy as np
import pytest
from transformers import AutoTokenizer

from components.data.byte_bpe import END_OF_TEXT, ByteBpeTokenizer
from components.data.tokenizer import pack_documents


@pytest.fixture(scope="module")
def texts(default_corpus):
    docs = default_corpus[default_corpus["noise_label"] == ""]
    return docs.groupby("domain").head(150)["text"].tolist()


@pytest.fixture(scope="module")
def tokenizer(texts):
    return ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=1024)).train(texts)


SAMPLES = [
    "def f(x):\n\treturn x  +  1\n",
    "  leading spaces, trailing spaces  ",
    "unicode: naïve café — 日本語 🙂\r\n",
    "347+68=415\n12-5=7",
    "",
]


def test_vocab_specials_and_exact_round_trip(tokenizer):
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == END_OF_TEXT
    assert tokenizer.eos_token_id == 0
    for text in SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.eos_token_id not in ids  # no special tokens added implicitly
        assert tokenizer.decode(ids) == text


def test_training_is_deterministic(texts, tokenizer):
    again = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=1024)).train(texts)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_save_and_load_offline(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.eos_token == END_OF_TEXT and loaded.model_max_length == 256
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_pack_documents_shapes_and_eos(tokenizer):
    texts = ["first document here", "second one", "third and final document text"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    total = sum(lengths) + len(texts)
    blocks = pack_documents(tokenizer, texts, seq_len=4)
    assert blocks.dtype == np.int32 and blocks.shape == (total // 4, 4)
    flat = np.concatenate([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts])
    np.testing.assert_array_equal(blocks.ravel(), flat[: blocks.size])
    eos_positions = np.flatnonzero(flat == tokenizer.eos_token_id)
    np.testing.assert_array_equal(eos_positions, np.cumsum(np.array(lengths) + 1) - 1)


def test_pack_documents_too_few_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"only \d+ tokens in 2 documents.*seq_len=256"):
        pack_documents(tokenizer, ["tiny", "docs"], seq_len=256)
