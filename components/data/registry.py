"""Registries of the data stages: which keys a recipe may name."""
from __future__ import annotations

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.corpus import CorpusBuilder
from components.data.heuristic_filter import HeuristicFilter
from components.data.minhash_dedup import MinHashDedup
from components.data.perplexity_filter import PerplexityFilter
from components.data.preselect import PreSelect
from components.data.random_selection import RandomSelection
from components.data.selector import Selector
from components.data.snowcoder import SnowCoder
from components.data.repeat_docs import RepeatDocs
from components.data.wrap import Wrap
from components.data.continuation import Continuation
from components.data.dsir import DSIR
from components.data.got_d import GotD
from components.data.instruction_mining import InstructionMining
from components.data.prox import ProX
from components.data.quality_review import QualityReview
from components.data.score_filter import ScoreFilter
from components.data.lexicon_score import LexiconScore
from components.data.domain_mix import DomainMix
from components.data.metadata_filter import MetadataFilter
from components.data.standard_corpus import StandardCorpus
from components.data.tokenizer import TokenizerTrainer
from components.registry import Registry

CORPUS_BUILDERS = Registry("corpus", CorpusBuilder, [StandardCorpus])
SELECTORS = Registry("select", Selector, [HeuristicFilter, MinHashDedup, RandomSelection, PerplexityFilter, PreSelect, SnowCoder, RepeatDocs, Wrap, Continuation, DSIR, GotD, InstructionMining, ProX, ScoreFilter, LexiconScore, DomainMix, MetadataFilter, QualityReview])
TOKENIZERS = Registry("tokenize", TokenizerTrainer, [ByteBpeTokenizer])
