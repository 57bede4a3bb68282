"""Sparse fine-tuning: keep an already sparse model's zero pattern (the sparse->sparse baseline)."""
from __future__ import annotations

import torch
from torch import nn

from components.registry import Paper
from components.train.masking import MaskedTraining
from components.train.method import block_linears


class SparseFinetune(MaskedTraining):
    """Fine-tune with the mask ``weight != 0`` of every block linear of the input model, so a
    sparse pre-trained (e.g. SPDF) model stays sparse; the counterpart of SPDF's dense phase."""

    key = "sparse"
    paper = Paper(
        title="SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models",
        url="https://arxiv.org/abs/2303.10464",
        arxiv="2303.10464",
    )

    class Params(MaskedTraining.Params):
        """Only the shared training hyperparameters; the mask comes from the model."""

    def build_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: linear.weight.detach() != 0 for name, linear in sorted(block_linears(model).items())}
