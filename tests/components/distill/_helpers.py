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
