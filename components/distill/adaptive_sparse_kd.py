"""The Adaptive Sparse Trainer's retraining with distillation (Huang et al., "Pruning Large Language
Models with Semi-Structural Adaptive Sparse Training", AAAI 2025, arXiv 2407.20584).

AST retrains a dense model to N:M sparsity with masks that keep adapting (SR-STE, the ``sr_ste``
training method) while the dense model teaches it. From the official repository
(``thu-ml/Adaptive-Sparse-Trainer``) [read]:
- ``sparse_modeling.Distill_Model.kl_loss``: ``T^2 * KL(p_teacher || p_student)`` of the
  temperature-softened logits, summed and divided by the number of tokens, with ``T = 2``;
- ``main.py``: ``loss = hardness_task * CE + hardness_kldiv * KL (+ hardness_squarehead *
  layerwise)``; the method notes give ``hardness_task 0.33, hardness_kldiv 0.67, squarehead 0``,
  and ``train.sh``'s commented distillation line has the same 1:2 ratio (1.0 and 2.0).
That is logit KD (``logit_kd``) with ``alpha = 0.67``, ``T = 2`` and forward KL, so this method is
the two existing ones combined: SR-STE's layers, mask and fold, and logit KD's loss. Nothing of
either is written again here.

AST's SLoRB (a low-rank term that keeps the pruned weights' information beside the 2:4 weight)
is SR-STE's ``slorb_group`` setting, so it is a param of this method too; the saved model folds
it into dense Linears. Not here: AST's Wanda mask metric, its annealed mask-change schedule and
its layer-wise ``squarehead`` loss (0 in the configuration above).
"""
from __future__ import annotations

from pydantic import Field
from torch import nn

from components.distill.logit_kd import LogitKD
from components.registry import Paper
from components.train.method import forward_flops_per_token
from components.train.sr_ste import SrSteTraining


class AdaptiveSparseKD(SrSteTraining, LogitKD):
    key = "ast_kd"
    paper = Paper(title="Pruning Large Language Models with Semi-Structural Adaptive Sparse Training",
                  url="https://arxiv.org/abs/2407.20584", arxiv="2407.20584")
    needs_teacher = True

    class Params(SrSteTraining.Params, LogitKD.Params):
        temperature: float = Field(2.0, gt=0, description="Softmax temperature of both models' logits (AST: 2).")
        alpha: float = Field(0.67, ge=0, le=1, description="Weight of the KD term, 1 - alpha of cross-entropy "
                             "(AST: hardness_kldiv 0.67, hardness_task 0.33).")

    def prepare(self, model: nn.Module) -> None:
        LogitKD.prepare(self, model)
        SrSteTraining.prepare(self, model)

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """SR-STE's training FLOPs plus the teacher's forward."""
        student = SrSteTraining.flops_per_token(self, model, seq_len)
        return student + (forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0)
