"""Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry", arXiv 2402.04347): convert a trained softmax-attention model to linear
attention with learned feature maps, in two phases, each a stage of this method.

- ``phase: distill`` trains only the feature maps (every other weight frozen) so each layer's
  linear attention weights match its softmax weights: the loss is the mean over layers of
  ``KL(softmax || linear)`` per query row (the paper's soft-label cross-entropy minus the
  softmax's entropy, which does not depend on the maps: the same gradient). The model's outputs
  stay softmax's while distilling, so every layer sees the teacher's hidden states.
- ``phase: finetune`` trains the converted model, linear attention in place, on the causal-LM
  loss (every weight and the maps train [guess: the paper also fine-tunes with LoRA; we train
  everything]).

``feature_map: elu`` is the paper's fixed-map baseline (elu + 1, nothing to distill): it only
fine-tunes. The maps and the attention are in ``components/model/linear_attention.py``; the
artifact is the plain Llama weights plus the maps in ``auxiliary.safetensors``, re-installed on
load, so the evaluate stage scores the linear-attention model.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from components.model.linear_attention import (
    MAP_ATTR, attention_modules, has_linear_attention, install_linear_attention, recorded_attention_kl,
    remove_linear_attention, set_distill_attention)
from components.registry import Paper
from components.train.method import (
    TrainingMethod, attention_width, check_own_attention, forward_flops_per_token, unwrap)


def linear_attention_kind(model: nn.Module) -> str | None:
    """The feature map of a model's linear attention, or None for softmax attention."""
    if not has_linear_attention(model):
        return None
    return getattr(attention_modules(model)[0], MAP_ATTR).kind


class HedgehogConversion(TrainingMethod):
    """Distil learned feature maps from softmax attention, or fine-tune the linear-attention model."""

    key = "hedgehog"
    paper = Paper(title="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
                  url="https://arxiv.org/abs/2402.04347", arxiv="2402.04347")
    one_process_only = "keeps the feature maps it trains beside the model, and only the training process holds them"

    class Params(TrainingMethod.Params):
        phase: Literal["distill", "finetune"] = Field(description="distill: train the feature maps alone to "
                                                      "mimic softmax attention; finetune: train the converted model")
        feature_map: Literal["hedgehog", "elu"] = Field("hedgehog", description="hedgehog: learned maps; elu: the "
                                                        "fixed elu+1 map (the paper's baseline; finetune only)")

        @model_validator(mode="after")
        def _check(self):
            if self.phase == "distill" and self.feature_map == "elu":
                raise ValueError("phase 'distill' needs feature_map 'hedgehog': the elu+1 map has no parameters "
                                 "to distil")
            check_own_attention(self.attention, "hedgehog", "linear")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self._maps: dict[str, torch.Tensor] = {}

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        plain = unwrap(model)
        present = linear_attention_kind(plain)
        if present is None:
            install_linear_attention(plain, self.params.feature_map)
        elif present != self.params.feature_map:
            raise ValueError(f"hedgehog: the input model already has {present!r} linear attention, but "
                             f"params.feature_map is {self.params.feature_map!r}")
        distill = self.params.phase == "distill"
        set_distill_attention(plain, distill)
        if distill:  # the maps alone train
            for name, param in plain.named_parameters():
                param.requires_grad_(f".{MAP_ATTR}." in name)

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        if self.params.phase == "finetune":
            return model(input_ids=batch, labels=batch).loss
        model(input_ids=batch, logits_to_keep=1)  # the layers record their KL; the logits are not needed
        return recorded_attention_kl(unwrap(model))

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """Fine-tuning: 3x the forward. Distilling: the forward once (the backward reaches only the
        maps, through detached queries and keys). Either way plus the maps' own forward and
        backward: per layer and head, two ``head_dim x head_dim`` projections per token."""
        n_layers, d_attn = attention_width(model)
        head_dim = d_attn // unwrap(model).config.num_attention_heads
        learned = self.params.feature_map == "hedgehog"
        maps = 3.0 * 2 * 2 * n_layers * d_attn * head_dim if learned else 0.0
        passes = 3.0 if self.params.phase == "finetune" else 1.0
        return passes * forward_flops_per_token(model, seq_len) + maps

    def finalize(self, model: nn.Module) -> dict:
        """Take the maps off the model (saved beside it) so the saved weights are a plain Llama."""
        plain = unwrap(model)
        self._maps = {k: v.cpu() for k, v in remove_linear_attention(plain).items()}
        plain.requires_grad_(True)
        return {"linear_attention": {"feature_map": self.params.feature_map}, "hedgehog_phase": self.params.phase}

    def auxiliary_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._maps)
