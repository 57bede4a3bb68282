"""Model scale presets and loading: every decoder is a Hugging Face ``LlamaForCausalLM``.

``nano`` is for tests (well under 1M params), ``micro`` for the CPU quickstart (~5M),
``small`` for a GPU (~125M). ``encoder_<size>_<position>`` (e.g. ``encoder_micro_alibi``) is the
MosaicBERT-style masked-LM encoder of ``components/model/encoder.py`` at the same widths, with
ALiBi, learned or no positions. Anything else is treated as a Hugging Face model path or name
and loaded with ``from_pretrained`` (local directories work offline).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel)

from components.model.encoder import POSITIONS, EncoderConfig, EncoderForMaskedLM

PRESETS: dict[str, dict] = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192),
    "micro_student": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384),
    "micro": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
}

ENCODER_SIZES = ("nano", "micro")
ENCODER_PRESETS: dict[str, dict] = {f"encoder_{size}_{position}": dict(**PRESETS[size], position=position)
                                    for size in ENCODER_SIZES for position in POSITIONS}
#: An encoder's learned position table holds this many times its training length, so that it can
#: be scored on longer sequences; the rows past the training length keep their initial values.
LEARNED_POSITIONS_HEADROOM = 4


def is_encoder(model) -> bool:
    return isinstance(getattr(model, "module", model), EncoderForMaskedLM)


def build_model(preset: str, vocab_size: int, max_seq_len: int, seed: int) -> PreTrainedModel:
    """A freshly initialised model from a preset, or a pretrained one from a path or hub name."""
    if preset in ENCODER_PRESETS:
        config = EncoderConfig(vocab_size=vocab_size, max_position_embeddings=LEARNED_POSITIONS_HEADROOM * max_seq_len,
                               **ENCODER_PRESETS[preset])
        torch.manual_seed(seed)
        return EncoderForMaskedLM(config)
    if preset in PRESETS:
        config = LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_seq_len,
            tie_word_embeddings=False,
            **PRESETS[preset],
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
    return load_model(preset)


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a causal LM, or this project's masked-LM encoder, with plain transformers
    (safetensors only, fp32 on CPU)."""
    # trust_remote_code=False: a config that maps to custom code is refused, never run (and never
    # answered by transformers' interactive [y/N] prompt, which hangs a pipeline)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    auto = AutoModelForMaskedLM if config.model_type == EncoderConfig.model_type else AutoModelForCausalLM
    return auto.from_pretrained(str(path), torch_dtype=torch.float32, use_safetensors=True, trust_remote_code=False)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
