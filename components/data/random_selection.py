"""Uniform random selection at a budget: the baseline every selector is compared against.

Each document gets a seeded uniform random score, so the budget fill keeps a uniform random
subset of the pool with the same token budget as the method it is compared with.
"""
from __future__ import annotations


import numpy as np
import pandas as pd

from components.data.selector import ScoringSelector, document_uniforms
from components.registry import Paper


class RandomSelection(ScoringSelector):
    key = "random"
    # the baseline every paper in this suite compares against; DSIR's paper reports it as "random"
    paper = Paper(title="Uniform random selection (the baseline of Xie et al. 2023, DSIR)",
                  url="https://arxiv.org/abs/2302.03169")

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        return document_uniforms(docs["id"], self.params.seed)
