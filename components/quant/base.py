"""Weight-only post-training quantization: the base class and the packed storage format.

Packed format, per quantized weight ``W`` of shape ``[out, in]`` stored under its state-dict name:

- ``<name>.qweight``: uint8, the unsigned integer codes of ``W`` in row-major order, bit-packed
  by ``packing.pack_int``.
- ``<name>.scales``: fp16, shape ``[rows, groups]``: ``[1, 1]`` per tensor, ``[out, 1]`` per
  channel, ``[out, in // group_size]`` per group.
- ``<name>.zeros``: uint8 zero points, same shape as ``scales``; only for asymmetric schemes.
  Symmetric schemes use the constant zero point ``2**(bits-1)`` (``meta["zero_point"]``) and
  store no zeros, so ``packed_bytes`` does not count bytes that carry no information.

A weight is recovered as ``(code - zero) * scale``. ``QuantizedModel.state_dict`` holds exactly
those dequantized values (fp32), so a model loads with plain transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from components.quant.packing import unpack_int
from components.registry import Method

# Set on a model's config once its weights hold dequantized values: quantizing twice would
# silently compound rounding error, so quantizers refuse such models.
QUANT_CONFIG_ATTR = "paperdag_quantization"


class QuantizationError(ValueError):
    """A model or parameter combination that cannot be quantized as asked."""


@dataclass
class QuantizedModel:
    state_dict: dict[str, torch.Tensor]
    packed: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def load_into(self, model: PreTrainedModel) -> PreTrainedModel:
        """Load the dequantized weights into ``model`` and mark its config as quantized."""
        model.load_state_dict(self.state_dict, strict=True)
        setattr(model.config, QUANT_CONFIG_ATTR, config_marker(self.meta))
        return model

    def save_packed(self, path) -> None:
        """Write the packed tensors as safetensors, with ``meta`` as JSON in the header."""
        import json

        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.packed.items()}, str(path),
                  metadata={"paperdag_quantization": json.dumps(self.meta)})


def config_marker(meta: dict) -> dict:
    """The small, JSON-friendly summary stored on ``model.config``."""
    keys = ("scheme", "bits", "granularity", "group_size", "symmetric")
    return {k: meta[k] for k in keys if k in meta}


def dequantize_packed(packed: dict[str, torch.Tensor], name: str, shape: tuple[int, ...],
                      bits: int, zero_point: int | None = None) -> torch.Tensor:
    """Rebuild the fp32 weight ``name`` from its packed codes, scales and zero points."""
    numel = 1
    for d in shape:
        numel *= d
    codes = unpack_int(packed[f"{name}.qweight"], bits, numel).to(torch.float32)
    scales = packed[f"{name}.scales"].to(torch.float32)
    zeros_key = f"{name}.zeros"
    if zeros_key in packed:
        zeros = packed[zeros_key].to(torch.float32)
    elif zero_point is not None:
        zeros = torch.full_like(scales, float(zero_point))
    else:
        raise QuantizationError(f"{name}: no {zeros_key} tensor and no implicit zero point given")
    grouped = codes.reshape(scales.shape[0], scales.shape[1], -1)
    return ((grouped - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(shape)


class Quantizer(Method):
    """Turns a trained fp32 model into quantized weights (dequantized copy + packed codes)."""

    def quantize(self, model: PreTrainedModel) -> QuantizedModel:
        raise NotImplementedError

    @staticmethod
    def refuse_if_quantized(model: PreTrainedModel) -> None:
        marker = getattr(model.config, QUANT_CONFIG_ATTR, None)
        if marker:
            raise QuantizationError(
                f"model is already quantized (config.{QUANT_CONFIG_ATTR} = {marker!r}); "
                "quantize the original full-precision model instead of re-quantizing")
        hf_marker = getattr(model.config, "quantization_config", None)
        if hf_marker:
            raise QuantizationError(
                f"model carries a transformers quantization_config ({hf_marker!r}); "
                "weight-only quantizers need a full-precision model")
