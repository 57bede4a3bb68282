"""PS-KD: self-knowledge distillation with progressively refined targets (Kim et al. 2021).

The model is its own teacher: the target of a token is ``(1-alpha_t)*onehot + alpha_t*p_prev``
where ``p_prev`` is the model's own prediction for that token from the previous epoch. A
language model has a vocabulary-sized distribution per token, so ``p_prev`` is kept as its
top-k (renormalized to sum to 1), per block and position, on the CPU.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.registry import Paper
from components.train.method import TrainingMethod


log = logging.getLogger("paperdag.train")
MIN_EPOCHS = 2.0  # below this most steps never see a previous prediction

def alpha_schedule(step: int, batch_size: int, n_blocks: int, total_steps: int, alpha_T: float) -> np.ndarray:
    """``alpha_t = alpha_T * t / T`` for each row of the batch of 1-based ``step``.

    ``t`` is the 0-based epoch of the row (its position in the endless data stream divided by
    ``n_blocks``; the trainer's data order is exactly that stream), ``T`` the total number of
    epochs ``total_steps * batch_size / n_blocks`` (may be fractional); capped at ``alpha_T``.
    Epoch 0 has ``alpha=0``: there is no previous prediction yet. (The official code uses
    ``(t+1)/T`` with ``p_prev = onehot`` in epoch 0; the brief and the paper's text use ``t/T``.)
    """
    positions = (step - 1) * batch_size + np.arange(batch_size)
    epochs = positions // n_blocks
    total_epochs = total_steps * batch_size / n_blocks
    return np.minimum(alpha_T, alpha_T * epochs / total_epochs)


def ps_kd_loss(log_probs: torch.Tensor, targets: torch.Tensor, alpha: torch.Tensor,
               prev_ids: torch.Tensor | None, prev_probs: torch.Tensor | None) -> torch.Tensor:
    """Soft-target CE ``-sum_v target_v log p_v``, mean over tokens.

    ``log_probs`` (B, S, V); ``targets`` (B, S); ``alpha`` (B,); ``prev_ids``/``prev_probs``
    (B, S, k): the sparse previous prediction (ignored where alpha is 0).
    """
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if prev_ids is None:
        return nll.mean()
    self_term = -(prev_probs.float() * log_probs.gather(-1, prev_ids.long())).sum(-1)
    a = alpha.to(log_probs.dtype).unsqueeze(-1)
    return ((1 - a) * nll + a * self_term).mean()


class PSKD(TrainingMethod):
    """Soft-target CE against ``(1-alpha_t)*onehot + alpha_t*p_prev`` (see ``alpha_schedule``).

    ``p_prev`` of a block is the top-k of the softmax the model produced on that block when it
    last saw it (in the previous epoch, in the forward of that step, as in the official code).
    Epochs come from the trainer's data stream (``bind`` gets the block count, ``on_batch``
    the block indices), so they are exact. The stored predictions are ``state_tensors``, so a
    resumed run is bit-identical. Memory: ``n_blocks * (seq_len-1) * top_k * 6`` bytes (CPU).
    """

    key = "ps_kd"
    shards_across_ranks = False  # its stored predictions are per block
    paper = Paper(
        title="Self-Knowledge Distillation with Progressive Refinement of Targets",
        url="https://arxiv.org/abs/2006.12000",
        arxiv="2006.12000",
    )
    needs_teacher = False

    class Params(TrainingMethod.Params):
        alpha_T: float = Field(0.8, ge=0, le=1, description="alpha at the end of training (the paper uses 0.8).")
        top_k: int = Field(8, ge=1, description="Entries of each previous prediction kept (renormalized).")

    def __init__(self, params=None):
        super().__init__(params)
        self._n_blocks = 0
        self._indices: np.ndarray | None = None
        self._step = 0
        self._prev_ids: torch.Tensor | None = None  # (n_blocks, seq_len-1, k) int32, CPU
        self._prev_probs: torch.Tensor | None = None  # same shape, float16

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        self._n_blocks = n_blocks
        epochs = self.epochs()
        if epochs < MIN_EPOCHS:
            # alpha is 0 for the whole first epoch: a short run is plain cross-entropy, silently
            log.warning("ps_kd: %d steps of %d blocks cover %.2f epochs of the %d training blocks; PS-KD's own "
                        "predictions get weight 0 for the whole first epoch, so %.0f%% of the steps are plain "
                        "cross-entropy. Train for several epochs (the paper trains 200-300)", self.params.steps,
                        self.params.batch_size, epochs, n_blocks, 100 * min(1.0, 1.0 / max(epochs, 1e-9)))

    def epochs(self) -> float:
        """How many passes over the training blocks the run makes."""
        return self.params.steps * self.params.batch_size / max(self._n_blocks, 1)

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        self._step, self._indices = step, np.asarray(indices)

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        if self._indices is None or len(self._indices) != batch.shape[0] or not self._n_blocks:
            raise RuntimeError("ps_kd needs the batch's block indices: the trainer calls bind() and on_batch()")
        params = self.params
        k = params.top_k
        log_probs = F.log_softmax(model(input_ids=batch).logits[:, :-1].float(), dim=-1)
        n_pos, vocab = log_probs.shape[1], log_probs.shape[2]
        if k > vocab:
            raise ValueError(f"ps_kd: top_k={k} exceeds the vocabulary size {vocab}")
        if self._prev_ids is None:
            self._prev_ids = torch.zeros((self._n_blocks, n_pos, k), dtype=torch.int32)
            self._prev_probs = torch.zeros((self._n_blocks, n_pos, k), dtype=torch.float16)
        elif self._prev_ids.shape[1:] != (n_pos, k):
            raise ValueError(f"ps_kd: stored predictions have shape {tuple(self._prev_ids.shape)}, "
                             f"batch needs (*, {n_pos}, {k})")
        rows = torch.from_numpy(self._indices.astype(np.int64))
        alpha = alpha_schedule(self._step, batch.shape[0], self._n_blocks, params.steps, params.alpha_T)
        if np.any(alpha > 0):
            prev_ids = self._prev_ids[rows].to(batch.device)
            prev_probs = self._prev_probs[rows].to(batch.device)
            loss = ps_kd_loss(log_probs, batch[:, 1:], torch.from_numpy(alpha).to(batch.device), prev_ids, prev_probs)
        else:
            loss = ps_kd_loss(log_probs, batch[:, 1:], torch.from_numpy(alpha).to(batch.device), None, None)
        with torch.no_grad():  # this epoch's prediction becomes the next epoch's target
            top = log_probs.detach().topk(k, dim=-1)
            probs = top.values.exp()
            probs = probs / probs.sum(-1, keepdim=True)
            self._prev_ids[rows] = top.indices.to("cpu", torch.int32)
            self._prev_probs[rows] = probs.to("cpu", torch.float16)
        return loss

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._prev_ids is None:
            return {}
        return {"prev_ids": self._prev_ids, "prev_probs": self._prev_probs}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = set(tensors) - {"prev_ids", "prev_probs"}
        if unknown:
            raise ValueError(f"ps_kd: unexpected state tensors {sorted(unknown)}")
        if tensors:
            self._prev_ids = tensors["prev_ids"].to("cpu").clone()
            self._prev_probs = tensors["prev_probs"].to("cpu").clone()
            if self._prev_ids.shape[0] != self._n_blocks:
                raise ValueError(f"ps_kd: checkpoint holds predictions for {self._prev_ids.shape[0]} blocks, "
                                 f"the data has {self._n_blocks}")

    def finalize(self, model: nn.Module) -> dict:
        return {"ps_kd_alpha_T": self.params.alpha_T, "ps_kd_top_k": self.params.top_k, "ps_kd_epochs": self.epochs()}
