"""Repeat every training document ``times`` times: multi-epoch training on a selected subset.

Arctic-SnowCoder's phase 2 (Wei et al. 2024, arXiv 2409.02326) continues pretraining on the
top-scored 12.5B tokens repeated 4 times (50B tokens): in a recipe, a ``snowcoder`` select stage
followed by this transform with ``times: 4``, then a tokenize stage reusing the phase-1
tokenizer and a fine-tune stage from the phase-1 model.

The first copy keeps the document's id (so its provenance and noise label still resolve by id);
copy k = 1..times-1 gets ``<id>#r<k>``. ``source`` and every other column are unchanged. Copies
follow the table order epoch by epoch (all first copies, then all second copies, ...); the
trainer shuffles blocks anyway.
"""
from __future__ import annotations

import pandas as pd
from pydantic import Field

from components.data.selector import DocumentTransform, SelectionContext, SelectionError
from components.registry import MethodParams, Paper


class RepeatDocs(DocumentTransform):
    """Every training document ``times`` times, with unique ids."""

    key = "repeat_docs"
    paper = Paper(title="Arctic-SnowCoder: Demystifying High-Quality Data in Code Pretraining (phase 2: "
                        "top-k tokens repeated 4x)",
                  url="https://arxiv.org/abs/2409.02326", arxiv="2409.02326")

    class Params(MethodParams):
        times: int = Field(4, ge=1, le=1000, description="copies of each document (SnowCoder phase 2: 4)")

    def transform(self, docs: pd.DataFrame, context: SelectionContext) -> pd.DataFrame:
        times = self.params.times
        copies = [docs]
        for k in range(1, times):
            copies.append(docs.assign(id=docs["id"] + f"#r{k}"))
        out = pd.concat(copies, ignore_index=True)
        if out["id"].duplicated().any():
            clash = out.loc[out["id"].duplicated(), "id"].iat[0]
            raise SelectionError(f"{context.stage}: repeat_docs: id {clash!r} would occur twice (the input already "
                                 f"has ids ending in '#r<k>'?)")
        return out
