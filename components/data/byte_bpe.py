"""Byte-level BPE (Sennrich et al. 2016; byte-level variant of GPT-2) trained with HF tokenizers."""
from __future__ import annotations

from typing import Iterable

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from components.budget import BPE_BYTES_PER_VOCAB_ENTRY, check_memory
from components.data.tokenizer import TokenizerTrainer
from components.registry import MethodParams, Paper

END_OF_TEXT = "<|endoftext|>"


class ByteBpeTokenizer(TokenizerTrainer):
    """GPT-2 style byte-level BPE: lossless on any text, ``<|endoftext|>`` as bos/eos/pad/unk."""

    key = "byte_bpe"
    paper = Paper(
        "Neural Machine Translation of Rare Words with Subword Units (byte-level BPE as in GPT-2)",
        url="https://arxiv.org/abs/1508.07909",
        arxiv="1508.07909",
    )

    class Params(MethodParams):
        vocab_size: int = Field(4096, ge=257 + 1, description="including the 256 byte symbols and specials")
        min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are never merged")
        seq_len: int = Field(256, ge=1, description="training block length; stored as model_max_length")

    def train(self, texts: Iterable[str]) -> PreTrainedTokenizerFast:
        check_memory(self.params.vocab_size * BPE_BYTES_PER_VOCAB_ENTRY,
                     f"training a byte-level BPE with vocab_size={self.params.vocab_size:,}")
        backend = Tokenizer(models.BPE())
        # No prefix space: decode(encode(text)) must reproduce the text exactly.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.params.vocab_size,
            min_frequency=self.params.min_frequency,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=END_OF_TEXT,
            eos_token=END_OF_TEXT,
            pad_token=END_OF_TEXT,
            unk_token=END_OF_TEXT,
            model_max_length=self.params.seq_len,
            clean_up_tokenization_spaces=False,
        )
