"""Activation fake-quantization at evaluation time (the ``A`` of WxAy), through forward pre-hooks.

A weight+activation quantizer stores ``meta["activations"]`` (an ``ActivationSpec``) and,
per quantized Linear, optional side tensors in ``activation.safetensors``:

- ``<module>.act_shift`` [in]: a per-channel shift subtracted before quantizing and added back
  afterwards (OutlierTune's symmetrization);
- ``<module>.act_transform`` / ``<module>.act_transform_inv`` [in, in]: an invertible input
  transform ``x -> x @ T`` applied before quantizing and undone after (FlatQuant). The stored
  weight already holds ``Q(W T^-T) T^T``, so without the hook the model is exactly the
  weight-only-quantized one;
- ``<module>.act_scale`` [in] or [1]: a static (calibrated) scale; without it scales are
  dynamic, per tensor or per token;
- ``<module>.act_clip`` [1]: a learned clipping ratio for dynamic scales.

The evaluate stage installs these hooks whenever a model artifact carries an activation
spec, so perplexity and the lm-eval task measure the model with quantized activations.
Plain ``transformers`` loading gives the weight-only model (hooks are not part of HF configs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from components.model.side_tensors import ACTIVATION_FILE  # noqa: F401  (where callers find it)
from components.quant.base import QuantizationError
from components.quant.fake_quant import fake_quant_int, int_scale_zero
from components.quant.minifloat import from_name, minifloat_fake_quant

SIDE_KEYS = ("act_shift", "act_transform", "act_transform_inv", "act_scale", "act_clip")


@dataclass(frozen=True)
class ActivationSpec:
    bits: int
    modules: tuple[str, ...]  # full Linear module names whose inputs are quantized
    granularity: Literal["per_tensor", "per_token"] = "per_token"  # for dynamic scales
    symmetric: bool = True
    format: str = "int"  # "int" or a minifloat name such as "e4m3" (scaled per token/tensor)

    def __post_init__(self):
        if self.format == "int" and not 2 <= self.bits <= 16:
            raise QuantizationError(f"activation bits={self.bits!r}; supported: 2..16")
        if self.format != "int":
            try:
                fmt = from_name(self.format)
            except ValueError as e:
                raise QuantizationError(f"activation format {self.format!r}: {e}") from None
            if fmt.bits != self.bits:
                raise QuantizationError(
                    f"activation format {self.format!r} has {fmt.bits} bits but bits={self.bits}; make them agree")
        if self.granularity not in ("per_tensor", "per_token"):
            raise QuantizationError(f"activation granularity {self.granularity!r}; use per_tensor or per_token")

    def to_meta(self) -> dict:
        return {**asdict(self), "modules": list(self.modules)}

    @classmethod
    def from_meta(cls, meta: dict) -> "ActivationSpec":
        return cls(**{**meta, "modules": tuple(meta["modules"])})


def fake_quant_activation(x: torch.Tensor, spec: ActivationSpec, side: dict[str, torch.Tensor]) -> torch.Tensor:
    """Quantize-dequantize one Linear input, with its optional shift, transform, scale and clip."""
    shift = side.get("act_shift")
    transform = side.get("act_transform")
    if shift is not None:
        x = x - shift
    if transform is not None:
        x = x @ transform
    x = _quantize(x, spec, side.get("act_scale"), side.get("act_clip"))
    if transform is not None:
        x = x @ side["act_transform_inv"]
    if shift is not None:
        x = x + shift
    return x


def _quantize(x: torch.Tensor, spec: ActivationSpec, static_scale, clip) -> torch.Tensor:
    if spec.format != "int":  # a minifloat grid, scaled so each token's (or the tensor's) absmax fits
        return minifloat_fake_quant(x, from_name(spec.format), scale_granularity=spec.granularity)
    if static_scale is not None:
        return fake_quant_int(x, static_scale, None, spec.bits, True)
    scale, zero = int_scale_zero(x, spec.bits, spec.symmetric, spec.granularity)
    if clip is not None:  # a learned clipping ratio shrinks the dynamic range
        scale = scale * clip
    return fake_quant_int(x, scale, zero, spec.bits, spec.symmetric)


def install_activation_quant(model: torch.nn.Module, spec: ActivationSpec,
                             side_state: dict[str, torch.Tensor]) -> list:
    """Register a pre-hook on each named Linear; returns the handles (``.remove()`` undoes it)."""
    modules = dict(model.named_modules())
    missing = [m for m in spec.modules if m not in modules]
    if missing:
        raise QuantizationError(f"activation spec names modules the model lacks: {missing[:3]}")
    handles = []
    for name in spec.modules:
        side = {k: side_state[f"{name}.{k}"] for k in SIDE_KEYS if f"{name}.{k}" in side_state}

        def hook(_module, args, side=side):
            return (fake_quant_activation(args[0], spec, side),) + tuple(args[1:])

        handles.append(modules[name].register_forward_pre_hook(hook))
    return handles
