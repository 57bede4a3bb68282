"""Lexicon rate score: the share of a document's words that come from a word list.

A stand-in for the toxicity / spam classifiers whose thresholds Longpre et al. 2023 ("A
Pretrainer's Guide to Training Data", arXiv 2305.13169) sweep (they used Perspective API). This
is a lexicon proxy, not a trained toxicity classifier: it sees listed words, not meaning, tone
or context, so it misses toxicity without listed words and flags innocent uses of them. The
default list is a small built-in set of spam- and abuse-style words (ours, guessed); pass
``lexicon`` for another (entries may be multi-word phrases).

Score = 1 - rate (1.0: no listed word), so the select stage keeps the cleanest documents first;
``invert`` scores the rate itself, keeping the most lexicon-heavy documents first (Longpre's
inverse filter). With ``keep_fraction: 1.0`` the stage keeps everything and only writes the
``lexicon_score_score`` column, which a ``score_filter`` stage can then sweep by threshold.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from components.data.selector import BudgetParams, ScoringSelector
from components.registry import Paper

DEFAULT_LEXICON = (
    # spam / scam style
    "casino", "jackpot", "viagra", "cialis", "pills", "loans", "payday", "forex", "crypto", "bitcoin",
    "cheap", "discount", "bonus", "prize", "winner", "replica", "backlinks", "seo", "followers",
    "click here", "buy now", "act now", "free money", "limited time offer", "weight loss", "lose weight",
    # abuse style
    "idiot", "idiots", "stupid", "moron", "morons", "dumb", "loser", "losers", "trash", "pathetic",
    "shut up", "hate you", "crap", "damn", "sucks", "scum", "worthless", "ugly",
)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letters, with an inner apostrophe


def lexicon_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lexicon_rate(text: str, singles: frozenset[str], phrases: dict[int, frozenset[tuple[str, ...]]]) -> float:
    """Share of words covered by a lexicon entry (a word counts once, however many entries cover it)."""
    words = lexicon_words(text)
    if not words:
        return 0.0
    covered = np.fromiter((w in singles for w in words), dtype=bool, count=len(words))
    for n, grams in phrases.items():
        for i in range(len(words) - n + 1):
            if tuple(words[i : i + n]) in grams:
                covered[i : i + n] = True
    return float(covered.mean())


class LexiconScore(ScoringSelector):
    """Ranks documents by how few of their words come from a lexicon."""

    key = "lexicon_score"
    paper = Paper("A Pretrainer's Guide to Training Data: Measuring the Effects of Data Age, Domain "
                  "Coverage, Quality, & Toxicity (lexicon proxy for its toxicity filter)",
                  url="https://arxiv.org/abs/2305.13169", arxiv="2305.13169")

    class Params(BudgetParams):
        lexicon: tuple[str, ...] = Field(DEFAULT_LEXICON, min_length=1,
                                         description="words or phrases (case-insensitive)")
        invert: bool = Field(False, description="score the rate itself: keep lexicon-heavy documents first")

        @field_validator("lexicon")
        @classmethod
        def _words(cls, value):
            bad = [entry for entry in value if not lexicon_words(entry)]
            if bad:
                raise ValueError(f"lexicon entries without letters: {bad}")
            return value

    def __init__(self, params=None):
        super().__init__(params)
        entries = [tuple(lexicon_words(e)) for e in self.params.lexicon]
        self._singles = frozenset(e[0] for e in entries if len(e) == 1)
        lengths = sorted({len(e) for e in entries if len(e) > 1})
        self._phrases = {n: frozenset(e for e in entries if len(e) == n) for n in lengths}

    def rates(self, texts) -> np.ndarray:
        return np.array([lexicon_rate(t, self._singles, self._phrases) for t in texts], dtype=np.float64)

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        rates = self.rates(docs["text"])
        return rates if self.params.invert else 1.0 - rates
