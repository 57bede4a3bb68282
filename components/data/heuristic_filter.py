"""Rule-based quality filtering in the style of Gopher's MassiveText rules (Rae et al. 2021, App. A).

Per-document statistics are computed once (``document_stats``); each rule is a vectorized
threshold on one column. Thresholds can be overridden per ``domain`` because code and arithmetic
legitimately break prose rules (many symbols, few stop words, one-token lines).
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from tqdm import tqdm

from components.data.selector import Selector
from components.registry import MethodParams, Paper

# Gopher's stop-word rule uses exactly these eight words.
GOPHER_STOPWORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
DEFAULT_BOILERPLATE_PHRASES = (
    "cookie", "privacy policy", "terms of service", "terms of use", "all rights reserved",
    "javascript", "sign in", "log in", "subscribe", "newsletter", "skip to", "back to top",
    "follow us", "share on", "read more", "contact us", "trademark",
)
_WORD_CHARS = re.compile(r"[^\W_]")  # alphanumeric (unicode-aware), underscore excluded


def _top_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by the most frequent word n-gram / characters in all words (Gopher)."""
    if len(words) < n or total_chars == 0:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return count * sum(len(w) for w in gram) / total_chars if count > 1 else 0.0


def document_stats(texts, boilerplate_phrases=DEFAULT_BOILERPLATE_PHRASES, progress: bool = False) -> pd.DataFrame:
    """One row of quality statistics per text."""
    phrases = tuple(p.lower() for p in boilerplate_phrases)
    rows = []
    for text in tqdm(texts, desc="heuristic stats", disable=not progress):
        words = text.split()
        n_words = len(words)
        word_chars = sum(len(w) for w in words)
        non_space = len(text) - sum(c.isspace() for c in text)
        alnum = len(_WORD_CHARS.findall(text))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        lowered = [line.lower() for line in lines]
        n_lines = max(len(lines), 1)
        n_stop = sum(w.lower().strip(".,;:!?\"'()") in GOPHER_STOPWORDS for w in words)
        rows.append(
            {
                "n_words": n_words,
                "mean_word_len": word_chars / n_words if n_words else 0.0,
                "symbol_ratio": (non_space - alnum) / non_space if non_space else 1.0,
                "alpha_word_fraction": sum(any(c.isalpha() for c in w) for w in words) / n_words if n_words else 0.0,
                "stopwords": n_stop,
                "stopword_fraction": n_stop / n_words if n_words else 0.0,
                "unique_word_fraction": len(set(words)) / n_words if n_words else 0.0,
                "duplicate_line_fraction": (len(lines) - len(set(lines))) / n_lines,
                "boilerplate_line_fraction": sum(any(p in line for p in phrases) for line in lowered) / n_lines,
                "top_2gram_fraction": _top_ngram_char_fraction(words, 2, word_chars),
                "top_3gram_fraction": _top_ngram_char_fraction(words, 3, word_chars),
                "top_4gram_fraction": _top_ngram_char_fraction(words, 4, word_chars),
            }
        )
    return pd.DataFrame(rows, columns=_STAT_COLUMNS)


class Thresholds(MethodParams):
    """One threshold per rule; ``None`` disables the rule."""

    min_words: int | None = Field(50, description="Gopher: 50 <= words")
    max_words: int | None = Field(100_000, description="Gopher: words <= 100,000")
    min_mean_word_len: float | None = Field(3.0, description="Gopher: mean word length in [3, 10]")
    max_mean_word_len: float | None = Field(10.0)
    max_symbol_ratio: float | None = Field(0.25, description="non-alphanumeric share of non-space chars")
    min_alpha_word_fraction: float | None = Field(0.8, description="Gopher: 80% of words contain a letter")
    min_stopwords: int | None = Field(2, description="Gopher: >= 2 of the eight stop words")
    min_stopword_fraction: float | None = Field(
        0.04, description="share of words that are Gopher stop words; word salad has almost none"
    )
    min_unique_word_fraction: float | None = Field(0.2, description="keyword stuffing has few word types")
    max_duplicate_line_fraction: float | None = Field(0.3, description="Gopher: duplicate lines <= 30%")
    max_boilerplate_line_fraction: float | None = Field(0.3, description="lines containing a boilerplate phrase")
    max_top_2gram_fraction: float | None = Field(0.20, description="Gopher: top 2-gram chars <= 20%")
    max_top_3gram_fraction: float | None = Field(0.18)
    max_top_4gram_fraction: float | None = Field(0.16)


# rule name -> (statistic column, direction)
_RULES = {
    "min_words": ("n_words", "min"),
    "max_words": ("n_words", "max"),
    "min_mean_word_len": ("mean_word_len", "min"),
    "max_mean_word_len": ("mean_word_len", "max"),
    "max_symbol_ratio": ("symbol_ratio", "max"),
    "min_alpha_word_fraction": ("alpha_word_fraction", "min"),
    "min_stopwords": ("stopwords", "min"),
    "min_stopword_fraction": ("stopword_fraction", "min"),
    "min_unique_word_fraction": ("unique_word_fraction", "min"),
    "max_duplicate_line_fraction": ("duplicate_line_fraction", "max"),
    "max_boilerplate_line_fraction": ("boilerplate_line_fraction", "max"),
    "max_top_2gram_fraction": ("top_2gram_fraction", "max"),
    "max_top_3gram_fraction": ("top_3gram_fraction", "max"),
    "max_top_4gram_fraction": ("top_4gram_fraction", "max"),
}
_STAT_COLUMNS = list(dict.fromkeys(stat for stat, _ in _RULES.values()))


def _default_domain_overrides() -> dict[str, dict[str, float | None]]:
    # Measured on the default corpus: the Python docs ("prose") embed grammar and code samples;
    # code is symbol-heavy with long identifiers and few English stop words; arithmetic docs are
    # ~12 one-token lines. Gopher's numbers stay the defaults for any other domain.
    return {
        "prose": {"min_words": 20, "max_symbol_ratio": 0.6, "min_alpha_word_fraction": 0.6,
                  "max_duplicate_line_fraction": 0.4},
        "code": {
            "min_words": 5, "min_stopwords": None, "min_stopword_fraction": None, "max_mean_word_len": 20.0, "max_symbol_ratio": 0.45,
            "min_alpha_word_fraction": 0.4, "min_mean_word_len": 2.5, "min_unique_word_fraction": 0.1,
            "max_duplicate_line_fraction": 0.5, "max_top_2gram_fraction": 0.4,
            "max_top_3gram_fraction": 0.4, "max_top_4gram_fraction": 0.4,
        },
        "arithmetic": {
            "min_words": 3, "min_mean_word_len": 3.0, "max_mean_word_len": 40.0, "max_symbol_ratio": 0.4,
            "min_alpha_word_fraction": None, "min_stopwords": None, "min_stopword_fraction": None,
            "min_unique_word_fraction": 0.5,
        },
    }


class HeuristicFilter(Selector):
    """Removes documents that break any Gopher-style quality rule for their domain."""

    key = "heuristic_filter"
    paper = Paper(
        "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
        url="https://arxiv.org/abs/2112.11446",
        arxiv="2112.11446",
    )

    class Params(MethodParams):
        defaults: Thresholds = Field(default_factory=Thresholds, description="rules for every domain")
        domain_overrides: dict[str, dict[str, float | None]] = Field(
            default_factory=_default_domain_overrides,
            description="per-domain {rule: threshold or null}, applied over `defaults`",
        )
        boilerplate_phrases: tuple[str, ...] = Field(
            DEFAULT_BOILERPLATE_PHRASES, description="case-insensitive substrings marking a boilerplate line"
        )
        progress: bool = False

        @model_validator(mode="after")
        def _known_rules(self):
            for domain, overrides in self.domain_overrides.items():
                unknown = sorted(set(overrides) - set(_RULES))
                if unknown:
                    raise ValueError(
                        f"domain_overrides[{domain!r}]: unknown rule(s) {unknown}; known: {sorted(_RULES)}"
                    )
            return self

    def thresholds_for(self, domain: str) -> dict[str, float | None]:
        merged = self.params.defaults.model_dump()
        merged.update(self.params.domain_overrides.get(domain, {}))
        return merged

    def keep_mask(self, docs: pd.DataFrame) -> np.ndarray:
        stats = document_stats(docs["text"].tolist(), self.params.boilerplate_phrases, self.params.progress)
        domains = docs["domain"].to_numpy() if "domain" in docs else np.full(len(docs), "")
        keep = np.ones(len(docs), dtype=bool)
        removed_by: dict[str, int] = {}
        for domain in sorted(set(domains.tolist())):
            rows = domains == domain
            for rule, threshold in self.thresholds_for(domain).items():
                if threshold is None:
                    continue
                column, direction = _RULES[rule]
                values = stats[column].to_numpy()[rows]
                failing = values < threshold if direction == "min" else values > threshold
                if failing.any():
                    index = np.flatnonzero(rows)[failing]
                    # Count a document under the first rule it fails, so reasons sum to removals.
                    removed_by[rule] = removed_by.get(rule, 0) + int(keep[index].sum())
                    keep[index] = False
        self.stats = {"n_docs": len(docs), "n_removed": int((~keep).sum()), "removed_by_rule": removed_by}
        return keep
