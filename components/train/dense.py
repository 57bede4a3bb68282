"""Dense causal-LM training of a Llama-architecture model (pretraining or full fine-tuning)."""
from __future__ import annotations

from components.registry import Paper
from components.train.method import TrainingMethod


class DenseTraining(TrainingMethod):
    """Plain next-token cross-entropy on every parameter; the baseline for every other method."""

    key = "dense"
    paper = Paper(
        title="LLaMA: Open and Efficient Foundation Language Models",
        url="https://arxiv.org/abs/2302.13971",
        arxiv="2302.13971",
    )

    class Params(TrainingMethod.Params):
        """Only the shared training hyperparameters."""
