"""Shared tiny models and data for the distillation tests."""
from __future__ import annotations

import numpy as np

from components.model.presets import build_model

VOCAB, SEQ = 64, 16


def pattern_blocks(n: int = 32) -> np.ndarray:
    starts = np.random.default_rng(0).integers(0, VOCAB, size=(n, 1))
    return ((starts + np.arange(SEQ)) % VOCAB).astype(np.int32)


def nano(seed: int, vocab: int = VOCAB, **overrides):
    model = build_model("nano", vocab_size=vocab, max_seq_len=32, seed=seed)
    if overrides:  # a different width/depth: rebuild from a modified config with the same seed
        import torch
        from transformers import LlamaForCausalLM

        config = model.config
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def trained_teacher(seed: int = 1):
    """A nano model trained 25 steps on the pattern blocks: the teacher of the KD tests."""
    from components.train.dense import DenseTraining
    from components.train.trainer import train

    config = DenseTraining.Params(steps=25, batch_size=8, lr=1e-2, precision="fp32")
    model = nano(seed=seed)
    train(model, pattern_blocks(), config, DenseTraining(config), progress=False)
    return model
