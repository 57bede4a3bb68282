"""WRAP: Web Rephrase Augmented Pre-training (Maini et al. 2024, arXiv 2401.16380).

Each training document is cut into chunks of whole sentences (about ``chunk_size`` words or
tokens; the paper rephrases ~300-token chunks split with NLTK's sentence splitter), every chunk
is rephrased by a text generator in one ``style`` (``simple`` = the paper's "easy", ``wikipedia``
= "medium", ``hard``, ``qa``), and the real documents are emitted together with the synthetic
ones. With ``synthetic_ratio=1`` every chunk is rephrased once, so the table holds real and
synthetic text of about equal size: the paper's 1:1 real:synthetic mix (the paper mixes by
sampling proportion; here the table itself carries the proportion and the trainer samples
uniformly). A lower ratio rephrases a seeded subset of the chunks.

Synthetic rows get ids ``<id>#wrap-<style>-<k>`` (k = chunk index in the document),
``source = wrap:<style>:<generator>``, and their document's domain and split.

The paper's gains need a large instruction-tuned rephraser (frozen Mistral-7B-Instruct). The
default ``restyle`` generator is a deterministic rule-based stand-in that only exercises the
plumbing; ``generator: model`` rephrases with a `reference` model, which at this project's CPU
scales is no paraphraser either. The chunk packing rule (greedy, a sentence longer than a chunk
is a chunk of its own) and the ratio-by-subset rule are guesses.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from components.data.generators import WRAP_PAPER, GenerationError, GenerationParams, make_generator, sentence_spans
from components.data.selector import (DocumentTransform, SelectionContext, SelectionError, apply_domains,
                                      document_uniforms)


def sentence_chunks(text: str, chunk_size: int, count=None) -> list[str]:
    """Substrings of ``text`` made of whole consecutive sentences, each about ``chunk_size`` long.

    ``count(sentence) -> int`` measures a sentence (default: words). Sentences are packed
    greedily; a sentence longer than ``chunk_size`` is a chunk of its own. Chunks keep the
    original layout (they are spans of ``text``).
    """
    count = count or (lambda s: len(s.split()))
    spans = sentence_spans(text)
    chunks, start, size, end = [], None, 0, None
    for a, b in spans:
        n = count(text[a:b])
        if start is not None and size + n > chunk_size:
            chunks.append(text[start:end].strip())
            start, size = None, 0
        if start is None:
            start = a
        size += n
        end = b
    if start is not None:
        chunks.append(text[start:end].strip())
    return chunks


def chosen_chunks(keys: list[tuple[str, int]], ratio: float, seed: int) -> np.ndarray:
    """Mask of the ``round(ratio * n)`` chunks with the smallest seeded hash draws: the choice of
    a chunk depends on its (doc id, index) and the seed, not on the table's order."""
    if ratio >= 1:
        return np.ones(len(keys), dtype=bool)
    draws = document_uniforms([f"{doc}\x00{k}" for doc, k in keys], seed)
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.argsort(draws, kind="stable")[: int(round(ratio * len(keys)))]] = True
    return keep


class Wrap(DocumentTransform):
    """Real documents plus rephrased chunks of them, in one style."""

    key = "wrap"
    paper = WRAP_PAPER

    class Params(GenerationParams):
        chunk_size: int = Field(225, ge=1, description="words (or tokens) per rephrased chunk; the paper uses "
                                                       "~300 tokens (about 225 English words)")
        chunk_unit: Literal["words", "tokens"] = Field("words", description="'tokens' counts with the `tokenizer` input")
        synthetic_ratio: float = Field(1.0, gt=0, le=1, description="fraction of chunks rephrased; 1.0 = every chunk "
                                                                    "once, i.e. ~1:1 real:synthetic (the paper)")
        domains: list[str] | None = Field(None, min_length=1, description="rephrase only these domains (others pass "
                                                                          "through); default all")

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}

    def transform(self, docs: pd.DataFrame, context: SelectionContext) -> pd.DataFrame:
        params = self.params
        where = f"{context.stage}: wrap"
        count = None
        if params.chunk_unit == "tokens":
            if context.tokenizer is None:
                raise SelectionError(f"{where}: chunk_unit='tokens' needs the `tokenizer` input; "
                                     f"give one or use chunk_unit='words'")
            backend = context.tokenizer.backend_tokenizer
            count = lambda s: len(backend.encode(s, add_special_tokens=False).ids)  # noqa: E731
        generator = make_generator(params, context)
        rewrite = apply_domains(docs, params.domains, where)
        keys, texts, rows = [], [], []
        for row in np.flatnonzero(rewrite):
            for k, chunk in enumerate(sentence_chunks(docs["text"].iat[row], params.chunk_size, count)):
                keys.append((docs["id"].iat[row], k))
                texts.append(chunk)
                rows.append(row)
        chosen = chosen_chunks(keys, params.synthetic_ratio, params.seed)
        keys = [key for key, c in zip(keys, chosen) if c]
        texts = [t for t, c in zip(texts, chosen) if c]
        rows = np.asarray(rows, dtype=np.int64)[chosen]
        outputs = generator.generate(texts)
        if len(outputs) != len(texts):
            raise GenerationError(f"{where}: generator {params.generator!r} returned {len(outputs)} texts "
                                  f"for {len(texts)} prompts")
        for (doc_id, k), out in zip(keys, outputs):
            if not out or not out.strip():
                raise GenerationError(f"{where}: generator {params.generator!r} (style {params.style!r}) returned "
                                      f"empty text for chunk {k} of document {doc_id!r}")
        synthetic = pd.DataFrame({
            "id": [f"{doc_id}#wrap-{params.style}-{k}" for doc_id, k in keys],
            "text": outputs,
            "domain": docs["domain"].to_numpy()[rows] if len(rows) else [],
            "source": f"wrap:{params.style}:{params.generator}",
            "split": docs["split"].to_numpy()[rows] if len(rows) else [],
        })
        clash = set(synthetic["id"]) & set(docs["id"])
        if clash:
            raise SelectionError(f"{where}: synthetic ids already exist in the input (wrap applied twice with "
                                 f"style {params.style!r}?), e.g. {sorted(clash)[0]!r}")
        real_words = int(docs["text"][rewrite].str.split().str.len().sum())
        synthetic_words = int(synthetic["text"].str.split().str.len().sum()) if len(synthetic) else 0
        self.facts = {"wrap_chunks_rephrased": len(synthetic), "wrap_chunks_total": len(chosen),
                      "wrap_real_words": real_words, "wrap_synthetic_words": synthetic_words,
                      "wrap_synthetic_per_real_word": synthetic_words / max(real_words, 1)}
        self.facts.update({f"wrap_{k}": v for k, v in generator.stats.items()})
        return pd.concat([docs, synthetic], ignore_index=True)
