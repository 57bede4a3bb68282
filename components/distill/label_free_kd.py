"""Label-free distillation (Cui et al. 2021): the student learns only the teacher's distribution.

"Beyond self-supervision" distills backbones on unlabeled images with the teacher's soft
predictions as the only signal. For a language model the "unlabeled text" is the token stream
itself: the next token is never used as a hard label, only the teacher's next-token
distribution is (``alpha`` fixed at 1 in logit KD).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.distill.logit_kd import LogitKD
from components.registry import Paper


class LabelFreeKD(LogitKD):
    """``loss = T^2 * KL(teacher_T || student_T)``, mean over positions; no cross-entropy term."""

    key = "label_free_kd"
    paper = Paper(
        title="Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative to Improve Backbones",
        url="https://arxiv.org/abs/2103.05959",
        arxiv="2103.05959",
    )

    class Params(LogitKD.Params):
        temperature: float = Field(1.0, gt=0, description="Softmax temperature T of both models' logits.")
        alpha: Literal[1.0] = Field(1.0, description="Fixed at 1: no hard-label cross-entropy.")
