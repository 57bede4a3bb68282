"""Logit knowledge distillation (Hinton et al. 2015) into a student with the same vocabulary."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.registry import Paper
from components.train.method import TrainingMethod, forward_flops_per_token, unwrap


def vocab_size(model: nn.Module) -> int:
    return unwrap(model).get_output_embeddings().out_features


def soft_kl(student_flat: torch.Tensor, teacher_flat: torch.Tensor, temperature: float,
            direction: str = "forward") -> torch.Tensor:
    """``T^2 * KL`` between temperature-softened (positions, vocab) logits, mean over positions.

    ``forward`` is KL(p_teacher || p_student), ``reverse`` is KL(p_student || p_teacher).
    """
    t = temperature
    log_student = F.log_softmax(student_flat.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_flat.float() / t, dim=-1)
    if direction == "forward":
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    else:
        kl = F.kl_div(log_teacher, log_student, log_target=True, reduction="batchmean")
    return t * t * kl


class LogitKD(TrainingMethod):
    """``loss = alpha * T^2 * KL(teacher_T, student_T) + (1 - alpha) * CE(student, next token)``.

    Softened distributions use temperature ``T``; the ``T^2`` keeps the KD gradient scale
    independent of ``T`` (Hinton et al., sec. 2). ``forward`` is KL(p_teacher || p_student)
    (mode covering, the paper's); ``reverse`` is KL(p_student || p_teacher) (mode seeking).
    Both are averaged over every predicted position (the ones CE also uses).
    """

    key = "logit_kd"
    paper = Paper(
        title="Distilling the Knowledge in a Neural Network",
        url="https://arxiv.org/abs/1503.02531",
        arxiv="1503.02531",
    )
    needs_teacher = True

    class Params(TrainingMethod.Params):
        temperature: float = Field(2.0, gt=0, description="Softmax temperature T of both models' logits.")
        alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha weighs hard-label CE.")
        direction: Literal["forward", "reverse"] = Field(
            "forward", description="'forward': KL(teacher||student); 'reverse': KL(student||teacher)."
        )

    def __init__(self, params=None):
        super().__init__(params)
        self._checked_teacher: int | None = None

    def _check_teacher(self, model: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError(f"method {self.key!r} needs a teacher model, got teacher=None")
        if self._checked_teacher == id(teacher):
            return
        student_vocab, teacher_vocab = vocab_size(model), vocab_size(teacher)
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"{self.key} needs a shared vocabulary: student vocab_size={student_vocab}, "
                f"teacher vocab_size={teacher_vocab}"
            )
        self._checked_teacher = id(teacher)

    def prepare(self, model: nn.Module) -> None:
        self._checked_teacher = None

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        self._check_teacher(model, teacher)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch).logits[:, :-1]
        student_logits = model(input_ids=batch).logits[:, :-1]
        vocab = student_logits.shape[-1]
        # fp32 softmax/KL even under bf16 autocast: the T-softened tails matter
        student_flat = student_logits.reshape(-1, vocab).float()
        teacher_flat = teacher_logits.reshape(-1, vocab).float()
        targets = batch[:, 1:].reshape(-1)
        params = self.params
        loss = student_flat.new_zeros(())
        if params.alpha > 0:
            loss = loss + params.alpha * soft_kl(student_flat, teacher_flat, params.temperature, params.direction)
        if params.alpha < 1:
            loss = loss + (1 - params.alpha) * F.cross_entropy(student_flat, targets)
        return loss

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """Student training (``6*N_student + attention``) plus the teacher's forward
        (``2*N_teacher + 2*n_layers*seq_len*d_attn``); see ``forward_flops_per_token``."""
        student = 3.0 * forward_flops_per_token(model, seq_len)
        return student + (forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0)
