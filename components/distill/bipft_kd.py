"""BiPFT's pretraining objective (Xing et al., AAAI 2024, arXiv 2312.08937): the binary network
learns from a full-precision teacher's hidden states as well as from the data.

From the reference code (``Xingrun-Xing/BiPFT``, ``binary_pretraining/learner.py``,
``KDLearner.__call__``) [read]: ``total = cls_dist + rep_dist + real_loss``, where ``real_loss``
is the student's own masked-LM loss, ``rep_dist`` the MSE between student and teacher hidden
states averaged over every state BERT returns (the embedding output and each layer's output),
and ``cls_dist`` a soft cross-entropy on the next-sentence logits; the MLM logits are not
distilled (``mlm_dist_loss`` is 0). For a decoder that is feature KD (``feature_kd``) with
``alpha = 0`` (no logit term), ``feature_weight = 1`` and every hidden state matched to the
same index of the teacher (0 = embeddings, l = block l), on top of causal-LM cross-entropy; the
next-sentence term has no counterpart here [ours]. The student is BiPFT's binary network
(``bipft``): its layers, fold and packing are that method's, the loss is feature KD's; nothing of
either is written again. The teacher is the FloatLM of the same shape (the reference distills
from a full-precision BERT of the student's architecture).
"""
from __future__ import annotations

from pydantic import Field
from torch import nn

from components.distill.feature_kd import FeatureKD
from components.train.bipft import BiPFTTraining


class BiPFTKD(BiPFTTraining, FeatureKD):
    key = "bipft_kd"
    needs_teacher = True

    class Params(BiPFTTraining.Params, FeatureKD.Params):
        alpha: float = Field(0.0, ge=0, le=1, description="Weight of logit KD (BiPFT: 0, its MLM logits are not "
                             "distilled); 1 - alpha weighs cross-entropy.")
        feature_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state MSE (BiPFT: 1).")

    def prepare(self, model: nn.Module) -> None:
        FeatureKD.prepare(self, model)
        BiPFTTraining.prepare(self, model)

    def default_layer_map(self, student_layers: int, teacher_layers: int) -> dict[int, int]:
        """Every hidden state to the teacher's of the same index, as the reference matches them."""
        if student_layers != teacher_layers:
            raise ValueError(f"bipft_kd: matching every hidden state needs a teacher as deep as the student "
                             f"({student_layers} layers), got {teacher_layers}; give params.layer_map")
        return {i: i for i in range(student_layers + 1)}

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """BiPFT's training FLOPs plus the teacher's forward (alpha 0: its blocks only, no head)."""
        return BiPFTTraining.flops_per_token(self, model, seq_len) + self.teacher_flops_per_token(teacher, seq_len)

    def finalize(self, model: nn.Module) -> dict:
        return {**FeatureKD.finalize(self, model), **BiPFTTraining.finalize(self, model)}
