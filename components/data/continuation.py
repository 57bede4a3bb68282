"""Non-instructional fine-tuning data (Xie, Syu and Lee 2024, arXiv 2409.00096).

The paper fine-tunes a pretrained LM on conversations built without any instruction: the first
half of a random web text is the "user" turn and a strong LLM's continuation of it (GPT-3.5 or
GPT-4) is the "assistant" turn. Here each training document (of the listed ``domains``) is cut
at its middle word: the first half is the instruction, the generator's output for it is the
response, and one document ``template`` (``{instruction}`` and ``{response}`` filled in) is
emitted per source document, with id ``<id>#cont`` and ``source =
continuation:<style>:<generator>``. The source documents of the listed domains are replaced
(``keep_original`` keeps them too); documents of other domains pass through unchanged.

The paper's result needs a large generator (GPT-3.5/4). ``generator: model`` with style
``continue`` (its default) lets a `reference` causal LM continue the text, which is the method's
shape, but a model trained here on CPU writes poor continuations; the default ``restyle``
generator (style ``simple``) does not continue at all, it restates the instruction in short
sentences, and only exercises the plumbing. The conversation format of the paper's fine-tuning
is the fine-tuned model's chat template; the default template here is a plain ``User:`` /
``Assistant:`` pair (a guess), and the loss covers every token (the train stage has no
response-only masking). The split at the middle word is a guess at "first half".
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from components.data.generators import GenerationError, GenerationParams, make_generator
from components.data.selector import DocumentTransform, SelectionContext, SelectionError, apply_domains
from components.registry import Paper

_WORD = re.compile(r"\S+")
_SLOT = re.compile(r"\{(instruction|response)\}")


def first_half(text: str) -> str:
    """The text up to (not including) its middle word, trailing whitespace removed."""
    starts = [m.start() for m in _WORD.finditer(text)]
    return text[: starts[len(starts) // 2]].rstrip() if len(starts) >= 2 else ""


def fill_template(template: str, instruction: str, response: str) -> str:
    """One pass over the template, so braces inside the texts are never substituted."""
    values = {"instruction": instruction, "response": response}
    return _SLOT.sub(lambda m: values[m.group(1)], template)


class Continuation(DocumentTransform):
    """(first half of a document, the generator's continuation) pairs as fine-tuning documents."""

    key = "continuation"
    paper = Paper(
        title="Non-instructional Fine-tuning: Enabling Instruction-Following Capabilities in Pre-trained "
              "Language Models without Instruction-Following Data",
        url="https://arxiv.org/abs/2409.00096",
        arxiv="2409.00096",
    )

    class Params(GenerationParams):
        style: str = Field("simple", description="default: 'continue' for generator 'model', 'simple' for 'restyle'")
        template: str = Field("User: {instruction}\nAssistant: {response}",
                              description="document text; must contain {instruction} and {response}")
        min_words: int = Field(8, ge=2, description="shorter documents are skipped (counted in stats)")
        keep_original: bool = Field(False, description="also keep the source documents")
        domains: list[str] | None = Field(None, min_length=1, description="use only these domains (others pass "
                                                                          "through); default all")

        @model_validator(mode="before")
        @classmethod
        def _style_follows_generator(cls, data):
            if isinstance(data, dict) and data.get("style") is None:
                data = {**data, "style": "continue" if data.get("generator") == "model" else "simple"}
            return data

        @field_validator("template")
        @classmethod
        def _slots(cls, value):
            missing = [s for s in ("{instruction}", "{response}") if s not in value]
            if missing:
                raise ValueError(f"template must contain {' and '.join(missing)}, got {value!r}")
            return value

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}

    def transform(self, docs: pd.DataFrame, context: SelectionContext) -> pd.DataFrame:
        params = self.params
        where = f"{context.stage}: continuation"
        generator = make_generator(params, context)
        use = apply_domains(docs, params.domains, where)
        n_words = docs["text"].str.split().str.len().to_numpy()
        short = use & (n_words < params.min_words)
        rows = np.flatnonzero(use & ~short)
        self.stats = {"short_docs_skipped": int(short.sum())}
        if len(rows) == 0:
            raise SelectionError(f"{where}: no document has at least min_words={params.min_words} words "
                                 f"({int(use.sum())} candidate documents); lower min_words")
        instructions = [first_half(docs["text"].iat[r]) for r in rows]
        responses = generator.generate(instructions)
        if len(responses) != len(instructions):
            raise GenerationError(f"{where}: generator {params.generator!r} returned {len(responses)} texts "
                                  f"for {len(instructions)} prompts")
        for r, response in zip(rows, responses):
            if not response or not response.strip():
                raise GenerationError(f"{where}: generator {params.generator!r} (style {params.style!r}) returned "
                                      f"empty text for document {docs['id'].iat[r]!r}")
        made = pd.DataFrame({
            "id": [f"{docs['id'].iat[r]}#cont" for r in rows],
            "text": [fill_template(params.template, i, o) for i, o in zip(instructions, responses)],
            "domain": docs["domain"].to_numpy()[rows],
            "source": f"continuation:{params.style}:{params.generator}",
            "split": docs["split"].to_numpy()[rows],
        })
        passthrough = docs if params.keep_original else docs[~use]
        clash = set(made["id"]) & set(passthrough["id"])
        if clash:
            raise SelectionError(f"{where}: ids already exist in the input (continuation applied twice?), "
                                 f"e.g. {sorted(clash)[0]!r}")
        self.facts = {"continuation_docs": len(made),
                      "continuation_response_words_mean": float(np.mean([len(o.split()) for o in responses]))}
        self.facts.update({f"continuation_{k}": v for k, v in generator.stats.items()})
        return pd.concat([passthrough, made], ignore_index=True)
