"""FerKD-style calibrated soft labels (Shen & Xing 2023), adapted from image crops to tokens.

FerKD notices that many random crops are poor views of the object: the teacher's soft label
there is unreliable, so it keeps soft labels for regions the teacher is confident about and
falls back to smoothed hard labels elsewhere. Here a "crop" is a next-token position: where the
teacher's top probability is at least ``threshold`` the target is the teacher's (temperature
softened) distribution, elsewhere it is the label-smoothed one-hot of the true next token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.distill.logit_kd import LogitKD
from components.registry import Paper
from components.train.method import TrainingMethod


def ferkd_targets(teacher_logits: torch.Tensor, targets: torch.Tensor, threshold: float,
                  label_smoothing: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(target distributions (N, V), confident mask (N,)) for flat logits (N, V) and ids (N,).

    Confidence is the teacher's max probability at temperature 1; smoothed hard labels put
    ``1 - eps + eps/V`` on the true token and ``eps/V`` elsewhere.
    """
    teacher_logits = teacher_logits.float()
    vocab = teacher_logits.shape[-1]
    confident = F.softmax(teacher_logits, dim=-1).amax(-1) >= threshold
    soft = F.softmax(teacher_logits / temperature, dim=-1)
    hard = torch.full_like(soft, label_smoothing / vocab)
    hard.scatter_(-1, targets.unsqueeze(-1), 1 - label_smoothing + label_smoothing / vocab)
    return torch.where(confident.unsqueeze(-1), soft, hard), confident


class FerKD(LogitKD):
    """Soft-target CE ``-sum_v target_v log p_student_v`` with ``ferkd_targets``, mean over tokens."""

    key = "ferkd"
    shards_across_ranks = False  # its confident-token counts would be one rank's share
    paper = Paper(
        title="FerKD: Surgical Label Adaptation for Efficient Distillation",
        url="https://arxiv.org/abs/2312.17473",
        arxiv="2312.17473",
    )

    class Params(TrainingMethod.Params):
        threshold: float = Field(0.5, ge=0, le=1, description="Teacher max-probability at or above which its soft label is used.")
        label_smoothing: float = Field(0.1, ge=0, lt=1, description="Smoothing eps of the hard labels at unconfident positions.")
        temperature: float = Field(1.0, gt=0, description="Temperature of the teacher's soft labels.")

    def __init__(self, params=None):
        super().__init__(params)
        self._confident = torch.zeros(2, dtype=torch.float64)  # (confident positions, all positions)

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        self._check_teacher(model, teacher)
        params = self.params
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch).logits[:, :-1]
            vocab = teacher_logits.shape[-1]
            target, confident = ferkd_targets(teacher_logits.reshape(-1, vocab), batch[:, 1:].reshape(-1),
                                              params.threshold, params.label_smoothing, params.temperature)
            counts = torch.stack([confident.sum(), torch.tensor(confident.numel(), device=confident.device)])
            self._confident = self._confident.to(counts.device) + counts.double()
        student = model(input_ids=batch).logits[:, :-1].reshape(-1, vocab).float()
        return -(target * F.log_softmax(student, dim=-1)).sum(-1).mean()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"confident_counts": self._confident}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"confident_counts"}:
            raise ValueError(f"ferkd: expected state tensor 'confident_counts', got {sorted(tensors)}")
        self._confident = tensors["confident_counts"].clone()

    def finalize(self, model: nn.Module) -> dict:
        confident, total = self._confident.tolist()
        return {"ferkd_confident_fraction": confident / total if total else 0.0}
