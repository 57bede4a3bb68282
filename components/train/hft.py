"""Half Fine-Tuning (HFT): each fine-tuning round updates half of the block weights, chosen at random.

HFT (Hui et al., 2024) fights catastrophic forgetting in sequential fine-tuning by freezing
half of the parameters in every round, so the frozen half keeps what earlier rounds learned
while the other half learns the new task. The selection, as the third-party reference README
describes it (the method notes mark it [R, third-party]):
- attention: in every layer, 2 of {q, k, v, o} are frozen (those four are the same size here);
- MLP: 2 of {gate, up, down} are frozen in a random half of the layers, 1 of 3 in the others;
so half of the block projections' weights train. [Guess: embeddings, norms and ``lm_head`` are
not named by that scheme; they train, as in full fine-tuning.]

In paperdag a round is one fine-tuning stage: the selection is drawn from the stage's ``seed``
when the stage starts (so every seed of a ``seeds:`` recipe draws its own half), and a
resumed run draws the same one. The facts name the frozen modules.
"""
from __future__ import annotations

import random

from torch import nn

from components.registry import Paper
from components.train.method import TrainingMethod, unwrap

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class HalfFinetune(TrainingMethod):
    key = "hft"
    paper = Paper(title="HFT: Half Fine-Tuning for Large Language Models", url="https://arxiv.org/abs/2404.18466",
                  arxiv="2404.18466")

    class Params(TrainingMethod.Params):
        """Only the shared training hyperparameters; the frozen half is drawn from ``seed``."""

    def frozen_modules(self, n_layers: int) -> list[str]:
        """Names (``model.layers.{i}.{self_attn|mlp}.{proj}``) of the projections this round freezes."""
        rng = random.Random(self.params.seed)
        two_frozen_mlp = set(rng.sample(range(n_layers), n_layers // 2))
        frozen = []
        for i in range(n_layers):
            frozen += [f"model.layers.{i}.self_attn.{name}" for name in sorted(rng.sample(ATTENTION, 2))]
            frozen += [f"model.layers.{i}.mlp.{name}"
                       for name in sorted(rng.sample(MLP, 2 if i in two_frozen_mlp else 1))]
        return frozen

    def prepare(self, model: nn.Module) -> None:
        model = unwrap(model)
        self._frozen = self.frozen_modules(len(model.model.layers))
        for name in self._frozen:
            model.get_submodule(name).requires_grad_(False)

    def finalize(self, model: nn.Module) -> dict:
        model = unwrap(model)
        frozen = sum(model.get_submodule(name).weight.numel() for name in self._frozen)
        block = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
        model.requires_grad_(True)  # the saved model is an ordinary one
        return {"hft_frozen_modules": self._frozen, "hft_frozen_block_fraction": frozen / block}
