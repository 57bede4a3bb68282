"""Registries of the data stages: which keys a recipe may name."""
from __future__ import annotations

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.corpus import CorpusBuilder
from components.data.heuristic_filter import HeuristicFilter
from components.data.minhash_dedup import MinHashDedup
from components.data.random_selection import RandomSelection
from components.data.selector import Selector
from components.data.standard_corpus import StandardCorpus
from components.data.tokenizer import TokenizerTrainer
from components.registry import Registry

CORPUS_BUILDERS = Registry("corpus", CorpusBuilder, [StandardCorpus])
SELECTORS = Registry("select", Selector, [HeuristicFilter, MinHashDedup, RandomSelection])
TOKENIZERS = Registry("tokenize", TokenizerTrainer, [ByteBpeTokenizer])
