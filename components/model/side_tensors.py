"""Tensors a model carries beside its plain weights (Hedgehog's feature maps, BiPFT's scales and
estimators), saved in an artifact's ``auxiliary.safetensors`` and copied back on load."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

AUXILIARY_FILE = "auxiliary.safetensors"  # a method's trained tensors beside the model (``auxiliary_tensors``)
ACTIVATION_FILE = "activation.safetensors"  # a WxAy model's activation scales and clips


def load_side_tensors(model: nn.Module, state: dict[str, torch.Tensor], expected: Iterable[str], what: str) -> None:
    """Copy ``state`` into the parameters and buffers of ``model`` it names, refusing a state whose
    names are not exactly ``expected`` (saved for another model or setting). ``what`` opens the error."""
    expected = set(expected)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{what} do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in state:
                tensor.copy_(state[name])
