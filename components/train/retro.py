"""Retrieval-augmented continued pretraining, InstructRetro-lite (Wang et al. 2023, "InstructRetro:
Instruction Tuning post Retrieval-Augmented Pretraining", arXiv 2310.07713; RETRO, Borgeaud et al.
2021, arXiv 2112.04426).

InstructRetro continues a pretrained GPT's training with retrieval: for each chunk the nearest
chunks of the corpus (with what follows them) are retrieved and the model attends to them. Here
each training block's first ``chunk_tokens`` are its query; its ``neighbours`` nearest training
blocks (``components/data/retrieval.py``, a FAISS index; the block itself excluded) are put in
front of it, and the loss is on the block's tokens after the query, the ones the neighbours may
help predict. ``neighbours_from: random`` puts random training blocks there instead: the same
layout, context length and compute, without retrieval (the control).

Different here (lite): RETRO and InstructRetro read the neighbours through a retrieval encoder and
chunked cross-attention layers added to the decoder; here the decoder reads them in its own
causal self-attention, as in-context retrieval does (Ram et al. 2023, "In-Context
Retrieval-Augmented Language Models"), so the trained artifact stays a plain
``LlamaForCausalLM``. One query per block, not one per 64-token chunk.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from components.data.retrieval import ChunkIndex, RetrievalLayout, with_neighbours
from components.registry import Paper
from components.train.method import TrainingMethod, forward_flops_per_token, step_seed

IGNORE = -100  # HF's ignored label


class RetrievalPretraining(TrainingMethod):
    """Causal LM on ``[retrieved neighbours | block]``, the loss after the block's query chunk."""

    key = "retro"
    paper = Paper(title="InstructRetro: Instruction Tuning post Retrieval-Augmented Pretraining",
                  url="https://arxiv.org/abs/2310.07713", arxiv="2310.07713")

    class Params(TrainingMethod.Params, RetrievalLayout):
        neighbours_from: Literal["retrieved", "random"] = Field(
            "retrieved", description="retrieved: the nearest training blocks; random: random ones (the control)")

    def __init__(self, params=None):
        super().__init__(params)
        self._index: ChunkIndex | None = None
        self._neighbour_rows: np.ndarray | None = None
        self._rows = np.zeros(0, dtype=np.int64)
        self._step = 0

    @property
    def layout(self) -> RetrievalLayout:
        return RetrievalLayout(**{k: getattr(self.params, k) for k in RetrievalLayout.model_fields})

    def use_blocks(self, blocks: np.ndarray) -> None:
        """Index the training blocks and retrieve every block's neighbours once (they depend on
        the data only, so a resumed run reads the same)."""
        self._index = ChunkIndex(blocks, self.layout)
        if self.params.neighbours_from == "retrieved":
            self._neighbour_rows = np.concatenate([self._index.key_neighbours(i, i + 1024)
                                                   for i in range(0, len(blocks), 1024)])

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        self._step, self._rows = step, np.asarray(indices)

    def neighbour_rows(self, rows: np.ndarray, step: int) -> np.ndarray:
        """Database rows put before each of the batch's blocks ``rows`` at ``step``."""
        if self._index is None:
            raise ValueError("retro needs its retrieval database: call method.use_blocks(blocks) before training")
        if self.params.neighbours_from == "retrieved":
            return self._neighbour_rows[rows]
        rng = np.random.default_rng(step_seed(self.params.seed, b"RETRO", step))
        n = len(self._index.blocks)
        out = rng.integers(0, n - 1, size=(len(rows), self.params.neighbours))
        return out + (out >= rows[:, None])  # never the block itself, as retrieval excludes it

    def batch_with_neighbours(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels) of the batch laid out behind its neighbours."""
        if len(self._rows) != len(batch):
            raise ValueError(f"retro: on_batch gave {len(self._rows)} block indices for a batch of {len(batch)}")
        values = self._index.values(self.neighbour_rows(self._rows, step))
        sequences, first_scored = with_neighbours(batch.detach().cpu().numpy(), values, self.params.chunk_tokens)
        labels = sequences.copy()
        labels[:, :first_scored] = IGNORE
        return torch.from_numpy(sequences).to(batch.device), torch.from_numpy(labels).to(batch.device)

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        ids, labels = self.batch_with_neighbours(batch, self._step)
        return model(input_ids=ids, labels=labels).loss

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """Per block token: the neighbours' tokens are read too, at the longer context."""
        context = seq_len + self.params.neighbours * self.params.neighbour_tokens
        return 3.0 * forward_flops_per_token(model, context) * context / seq_len

    def finalize(self, model: nn.Module) -> dict:
        return {"retrieval": {**self.layout.model_dump(), "neighbours_from": self.params.neighbours_from,
                              "database_blocks": len(self._index.blocks)}}
