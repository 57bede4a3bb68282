"""SPDF sparse pre-training: a static, uniform random unstructured mask on the block linears."""
from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from components.registry import Paper
from components.train.masking import MaskedTraining
from components.train.method import block_linears


class SpdfTraining(MaskedTraining):
    """Pre-train with a fixed random mask (Thangarasa et al. 2023, sparse phase of SPDF).

    Every linear layer of the transformer blocks (q/k/v/o and MLP projections) gets the same
    sparsity, drawn uniformly at random once and kept static; embeddings and ``lm_head`` stay
    dense, as in the paper. The dense fine-tuning phase is the ``dense`` finetune method.
    """

    key = "spdf"
    paper = Paper(
        title="SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models",
        url="https://arxiv.org/abs/2303.10464",
        arxiv="2303.10464",
    )

    class Params(MaskedTraining.Params):
        sparsity: float = Field(
            0.75, description="Fraction of each block linear's weights masked to zero; the paper used 0.5-0.75."
        )
        mask_seed: int = Field(0, description="Seed of the random mask (independent of the training seed).")

        @field_validator("sparsity")
        @classmethod
        def _open_unit_interval(cls, value: float) -> float:
            if not 0.0 < value < 1.0:
                raise ValueError(f"sparsity must be in (0, 1) (the paper used 0.5-0.75), got {value}")
            return value

    def build_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.params.mask_seed)
        masks = {}
        for name, linear in sorted(block_linears(model).items()):
            numel = linear.weight.numel()
            n_zero = round(self.params.sparsity * numel)  # exactly the same sparsity in every layer
            mask = torch.ones(numel, dtype=torch.bool)
            mask[torch.randperm(numel, generator=generator)[:n_zero]] = False
            masks[name] = mask.view_as(linear.weight).to(linear.weight.device)
        return masks
