"""The evaluate stage scores a model only on tokens of the tokenizer it was trained with."""
from __future__ import annotations

import pytest

from components.data.byte_bpe import ByteBpeTokenizer
from tasks.model_io import TokenizerMismatchError, check_model_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog " * 20, "def add(a, b):\n    return a + b\n" * 20]


def train_tokenizer(texts, vocab_size=270):
    return ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=vocab_size, seq_len=32)).train(iter(texts))


def test_the_same_vocabulary_passes_and_another_one_of_the_same_size_is_refused(tmp_path):
    tokenizer = train_tokenizer(TEXT)
    tokenizer.save_pretrained(str(tmp_path / "model"))
    check_model_tokenizer(tmp_path / "model", tokenizer, "stage evaluate: model m")  # its own: no error
    other = train_tokenizer(["lorem ipsum dolor sit amet " * 30, "SELECT * FROM t WHERE x = 1;\n" * 30])
    assert len(other) == len(tokenizer)  # same size: a vocab_size check alone would not notice
    with pytest.raises(TokenizerMismatchError, match=r"stage evaluate: model m: the model was trained with another "
                                                     r"tokenizer \(270 entries against 270; \d+ tokens"):
        check_model_tokenizer(tmp_path / "model", other, "stage evaluate: model m")
    with pytest.raises(TokenizerMismatchError, match="270 entries against 265"):
        check_model_tokenizer(tmp_path / "model", train_tokenizer(TEXT, vocab_size=265), "x")


def test_a_training_stage_refuses_an_input_model_of_another_tokenizer_of_the_same_size(tmp_path):
    from components.model.presets import build_model
    from tasks.train import _check_vocab

    tokenizer = train_tokenizer(TEXT)
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=32, seed=0)
    tokenizer.save_pretrained(str(tmp_path / "model"))
    _check_vocab(model, tokenizer, "input model m", "ft", tmp_path / "model")  # its own: no error
    other = train_tokenizer(["lorem ipsum dolor sit amet " * 30, "SELECT * FROM t WHERE x = 1;\n" * 30])
    with pytest.raises(TokenizerMismatchError, match=r"stage ft: input model m and the stage's tokens: the model "
                                                     r"was trained with another tokenizer"):
        _check_vocab(model, other, "input model m", "ft", tmp_path / "model")
    _check_vocab(model, other, "model 'nano'", "ft")  # a model built here has no tokenizer of its own yet
