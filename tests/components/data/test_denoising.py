"""Span corruption's format: T5-style noise spans, sentinels and mode tokens that are single
control-byte tokens of a byte-level BPE, examples that decode back to their source."""
import numpy as np
import pytest
import torch

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.denoising import (
    SENTINEL_BYTES,
    DenoisingTokens,
    corrupt,
    fim_example,
    infill_example,
    random_spans,
    source_length,
)

TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times\n" for i in range(150)] + \
        [f"def f(x):\n    return x + {i}\n" for i in range(150)]


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=64)).train(TEXTS)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return DenoisingTokens.from_tokenizer(tokenizer)


def uncorrupt(sequence: np.ndarray, n_input: int, tokens: DenoisingTokens) -> np.ndarray:
    """The source back from an R/X example: each input sentinel replaced by its target span."""
    inputs, targets = list(sequence[1:n_input]), list(sequence[n_input:])
    spans, current = [], None
    for t in targets:
        if t in tokens.sentinels and (current is None or len(spans) < len(inputs)):
            current = []
            spans.append(current)
        else:
            current.append(t)
    out, k = [], 0
    for t in inputs:
        if t in tokens.sentinels:
            out += spans[k]
            k += 1
        else:
            out.append(t)
    return np.array(out)


def test_mode_tokens_and_sentinels_are_distinct_single_byte_tokens(tokenizer, tokens):
    ids = [*tokens.modes.values(), *tokens.sentinels, *tokens.fim.values()]
    assert len(set(ids)) == len(ids) == 3 + len(SENTINEL_BYTES) + 3
    for byte, i in zip(SENTINEL_BYTES, tokens.sentinels):
        assert tokenizer.decode([i]) == chr(byte)
    assert tokens.pad == tokenizer.pad_token_id
    assert not torch.isin(torch.tensor(tokenizer("".join(TEXTS))["input_ids"]), tokens.reserved).any()


def test_a_tokenizer_without_byte_tokens_is_refused():
    class WordPieces:  # encodes a control byte as two pieces, as a non-byte-level vocabulary would
        pad_token_id = eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="mode R byte 0x0e is 2 tokens .* control tokens need a byte-level tokenizer"):
        DenoisingTokens.from_tokenizer(WordPieces())


@pytest.mark.parametrize("length, corruption, mean_span", [(100, 0.15, 3), (100, 0.5, 3), (125, 0.15, 64),
                                                           (60, 0.5, 64), (10, 0.15, 3)])
def test_noise_spans_are_t5s(length, corruption, mean_span):
    rng = np.random.default_rng(0)
    for _ in range(20):
        spans = random_spans(length, corruption, mean_span, rng)
        noise = sum(e - s for s, e in spans)
        assert noise == min(max(round(length * corruption), 1), length - 1)
        assert len(spans) == min(max(round(noise / mean_span), 1), noise, length - noise)
        assert spans[0][0] > 0 and all(e > s for s, e in spans)  # the source starts with kept text
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= length


@pytest.mark.parametrize("mode, corruption, mean_span", [("R", 0.15, 3), ("R", 0.15, 8), ("X", 0.5, 3),
                                                         ("X", 0.15, 64), ("X", 0.5, 64)])
def test_span_corruption_fits_the_block_and_decodes_back_to_its_source(tokenizer, tokens, mode, corruption,
                                                                       mean_span):
    source_ids = np.array(tokenizer("".join(TEXTS[::7]))["input_ids"])
    length = source_length(64, mode, corruption, mean_span)
    sequence, n_input = corrupt(source_ids[:length], mode, corruption, mean_span, tokens, np.random.default_rng(1))
    assert len(sequence) <= 64 and sequence[0] == tokens.modes[mode]
    assert sequence[n_input] == tokens.sentinels[0]  # targets open with the first span's sentinel
    np.testing.assert_array_equal(uncorrupt(sequence, n_input, tokens), source_ids[:length])


def test_the_s_denoiser_is_a_prefix_lm_split(tokenizer, tokens):
    source_ids = np.arange(63)
    sequence, n_input = corrupt(source_ids, "S", 0.25, 3.0, tokens, np.random.default_rng(0))
    assert sequence[0] == tokens.modes["S"] and n_input == 1 + 47  # round(63 * 0.75)
    np.testing.assert_array_equal(sequence[1:], source_ids)


def test_infilling_is_the_x_format_with_one_span(tokens):
    prefix, middle, suffix = np.arange(5), np.arange(5, 8), np.arange(8, 12)
    sequence, n_context = infill_example(prefix, middle, suffix, tokens)
    np.testing.assert_array_equal(sequence[n_context:], middle)
    s0, x = tokens.sentinels[0], tokens.modes["X"]
    np.testing.assert_array_equal(sequence[:n_context], [x, *prefix, s0, *suffix, s0])


def test_fill_in_the_middle_is_psm(tokens):
    prefix, middle, suffix = np.arange(5), np.arange(5, 8), np.arange(8, 12)
    sequence, n_context = fim_example(prefix, middle, suffix, tokens)
    np.testing.assert_array_equal(sequence[n_context:], middle)
    np.testing.assert_array_equal(sequence[:n_context], [tokens.fim["PRE"], *prefix, tokens.fim["SUF"], *suffix,
                                                         tokens.fim["MID"]])


def test_data_holding_a_reserved_token_is_refused(tokens):
    ids = torch.tensor([[1, 2, tokens.sentinels[3], 4]])
    with pytest.raises(ValueError, match=f"stage x: the data holds token id\\(s\\) \\[{tokens.sentinels[3]}\\]"):
        tokens.check_absent(ids, "stage x")


def test_a_block_too_short_for_span_corruption_is_refused():
    """A span-corrupted example needs a mode token and two sentinels per span beside its source;
    blocks shorter than that are refused naming the block length, not trained on empty sources."""
    from components.data.denoising import source_length

    assert source_length(8, "S", 0.15, 3.0) == 7  # the prefix-LM split needs only the mode token
    with pytest.raises(ValueError, match="seq_len 4 is too short for span corruption"):
        source_length(4, "R", 0.15, 3.0)
    assert source_length(16, "R", 0.15, 3.0) == 13  # 13 source tokens, one span's 2 sentinels, the mode token
