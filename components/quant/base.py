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

Binary weights (``±scale``, one scale per tensor or output channel; BiPFT, binary QAT) use the
``sign`` format instead (``meta["tensors"][name]["format"] == "sign"``): one bit per weight, code
1 for ``+scale`` and 0 for ``-scale``, and fp32 ``scales``; no integer zero point puts both values
on a 1-bit ``(code - zero) * scale`` grid. ``decode_packed`` reads either format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.packing import QUANT_CONFIG_ATTR, SUPPORTED_BITS, pack_int, unpack_int
from components.registry import Method, MethodParams



class QuantizationError(ValueError):
    """A model or parameter combination that cannot be quantized as asked."""


@dataclass
class QuantizedModel:
    state_dict: dict[str, torch.Tensor]
    packed: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    # Per-Linear tensors the activation fake-quant hooks need (transforms, shifts, static
    # scales), saved as ``activation.safetensors``; see components/quant/activation.py.
    activation_state: dict[str, torch.Tensor] = field(default_factory=dict)

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
    keys = ("scheme", "bits", "granularity", "group_size", "symmetric", "bits_per_weight")
    marker = {k: meta[k] for k in keys if k in meta}
    if meta.get("activations"):
        marker["activation_bits"] = meta["activations"]["bits"]
    return marker


class PackedWeights:
    """Collects each quantized tensor's packed codes and side tensors, then sums the real bytes.

    Every quantizer stores its result through this, so ``meta`` has one shape for all of
    them: totals (``packed_bytes``, ``bits_per_weight``: all stored bytes, scales included,
    over the quantized weights) plus ``tensors[name]`` describing each tensor's format."""

    def __init__(self) -> None:
        self.packed: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, dict] = {}

    def add_int(self, name: str, shape, codes: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bits: int, granularity: str, group_size: int | None,
                symmetric: bool) -> None:
        """An integer-grid tensor in the ``(code - zero) * scale`` format of the module docstring."""
        extra = {"scales": scales} if zeros is None else {"scales": scales, "zeros": zeros}
        self.add_codes(name, shape, codes, bits, extra, format="int", granularity=granularity,
                       group_size=group_size if granularity == "group" else None, symmetric=symmetric,
                       zero_point=2 ** (bits - 1) if symmetric else None)

    def add_codes(self, name: str, shape, codes: torch.Tensor, bits: int,
                  extra: dict[str, torch.Tensor], **info) -> None:
        """Any ``bits``-wide code tensor plus named side tensors (``<name>.<key>``)."""
        self.packed[f"{name}.qweight"] = pack_int(codes.reshape(-1), bits)
        for key, tensor in extra.items():
            self.packed[f"{name}.{key}"] = tensor.contiguous()
        self.tensors[name] = dict(bits=bits, shape=list(shape), **info)

    def add_sign(self, name: str, weight: torch.Tensor, granularity: str) -> None:
        """A binary tensor (every entry ``±scale`` of its tensor or output channel) at one bit per
        weight, in the ``sign`` format. ``sign(0) = 0`` can leave exact zeros in a binarized
        weight, which one bit cannot hold: such a tensor is stored on the 2-bit symmetric int grid."""
        if granularity not in ("per_tensor", "per_channel"):
            raise QuantizationError(f"{name}: a binary weight takes one scale per tensor or per output channel, "
                                    f"not {granularity!r}")
        weight = weight.detach().float()
        rows = weight.reshape(weight.shape[0] if granularity == "per_channel" else 1, 1, -1)
        scale = rows.abs().amax(-1)
        has_zeros = bool((rows == 0).any())
        on_grid = (rows.abs() == scale.unsqueeze(-1)) | (rows == 0)
        if not bool(on_grid.all()):
            worst = float((rows.abs() - scale.unsqueeze(-1)).abs().masked_fill(on_grid, 0).max())
            raise QuantizationError(f"{name} is not a binary weight: entries differ in magnitude from their "
                                    f"{granularity.replace('_', ' ')} scale by up to {worst:.3g}")
        if has_zeros:
            self.add_symmetric(name, weight, 2, granularity)
            return
        self.add_codes(name, weight.shape, (rows > 0).to(torch.uint8), 1, {"scales": scale}, format="sign",
                       granularity=granularity, group_size=None, symmetric=True)

    def add_symmetric(self, name: str, weight: torch.Tensor, bits: int, granularity: str,
                      group_size: int | None = None, grid: str | None = None) -> torch.Tensor:
        """A 2-D weight already on a symmetric ``bits``-bit grid (``code * scale``, one scale per
        tensor, output channel or group: its max |w| over qmax) as int codes; returns what they
        decode to. A weight off the grid is refused, ``grid`` (default: the bit width) named."""
        weight = weight.detach().float()
        qmax = 2 ** (bits - 1) - 1
        out_features, in_features = weight.shape
        sets = {"per_tensor": (1, 1), "per_channel": (out_features, 1),
                "group": (out_features, in_features // (group_size or in_features))}[granularity]
        rows = weight.reshape(*sets, -1)
        scale = rows.abs().amax(-1) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(rows / scale.unsqueeze(-1))
        dequantized = (codes * scale.unsqueeze(-1)).reshape(weight.shape)
        if codes.abs().max() > qmax or not torch.allclose(dequantized, weight, rtol=1e-6, atol=0):
            raise QuantizationError(f"{name} is not on the {grid or f'symmetric {bits}-bit'} grid (max difference "
                                    f"{float((dequantized - weight).abs().max()):.3g})")
        self.add_int(name, weight.shape, (codes + 2 ** (bits - 1)).to(torch.uint8).reshape(weight.shape), scale,
                     None, bits, granularity, group_size, True)
        return dequantized

    def add_raw(self, name: str, tensor: torch.Tensor) -> None:
        """A side tensor that belongs to no single weight (e.g. a mask); counted in the bytes."""
        self.packed[name] = tensor.contiguous()

    def meta(self, scheme: str, **extra) -> dict:
        n_weights = sum(_numel(t["shape"]) for t in self.tensors.values())
        packed_bytes = sum(t.numel() * t.element_size() for t in self.packed.values())
        shapes = {name: t["shape"] for name, t in self.tensors.items()}
        return dict(scheme=scheme, quantized_tensors=list(shapes), shapes=shapes, tensors=self.tensors,
                    n_quantized_weights=n_weights, packed_bytes=packed_bytes,
                    fp32_bytes_of_quantized=4 * n_weights,
                    bits_per_weight=packed_bytes * 8 / n_weights if n_weights else 0.0, **extra)


def check_bits(method: str, bits: int) -> None:
    """Params may be built without validation (``model_construct``), so quantizers re-check."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"{method}: unsupported bits={bits!r}; supported bits: {list(SUPPORTED_BITS)}")


def uniform_int_meta(params) -> dict:
    """The ``meta`` keys describing one integer grid used for every tensor."""
    return dict(bits=params.bits, granularity=params.granularity,
                group_size=params.group_size if params.granularity == "group" else None,
                symmetric=params.symmetric, zero_point=2 ** (params.bits - 1) if params.symmetric else None)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decode_packed(packed: dict[str, torch.Tensor], name: str, spec: dict) -> torch.Tensor:
    """The fp32 weight ``name`` from its packed tensors and its ``meta["tensors"][name]`` entry,
    in the int or the sign format."""
    shape = tuple(spec["shape"])
    if spec.get("format", "int") == "sign":
        codes = unpack_int(packed[f"{name}.qweight"], 1, _numel(shape)).to(torch.float32)
        scales = packed[f"{name}.scales"].to(torch.float32)
        return ((2 * codes.reshape(scales.shape[0], scales.shape[1], -1) - 1) * scales.unsqueeze(-1)).reshape(shape)
    if spec.get("format", "int") != "int":
        raise QuantizationError(f"{name}: decode_packed reads the int and sign formats, not {spec['format']!r}")
    return dequantize_packed(packed, name, shape, int(spec["bits"]), spec.get("zero_point"))


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


BLOCK_PREFIX = "model.layers."  # decoder blocks of a HF Llama-style model


class ActivationParams(MethodParams):
    """Dynamic activation fake-quant for the quantized Linears' inputs (the A of WxAy)."""

    bits: int = Field(8, ge=2, le=16, description="activation bits (int format)")
    granularity: Literal["per_token", "per_tensor"] = Field("per_token", description="one scale per token or per tensor")
    symmetric: bool = Field(True, description="symmetric grid around 0")
    format: str = Field("int", description='"int" or a minifloat name such as "e4m3" (scaled per token/tensor)')


class TargetParams(MethodParams):
    targets: list[str] | None = Field(
        None, min_length=1,
        description="module-name suffixes to quantize, e.g. ['q_proj', 'mlp.down_proj']; "
                    "None = every nn.Linear inside model.model.layers. lm_head and "
                    "embeddings are never quantized")
    activations: ActivationParams | None = Field(
        None, description="also quantize those Linears' inputs at evaluation (WxAy); None = weight-only")


class CalibratedParams(TargetParams):
    seed: int = Field(0, description="picks the calibration sequences (the recipe's seed by default)")
    calibration_sequences: int = Field(
        128, gt=0, description="training-split token blocks used as calibration data (fixed seed)")


class Quantizer(Method):
    """Turns a trained fp32 model into quantized weights (dequantized copy + packed codes).

    ``needs_calibration`` quantizers get ``calibration``: token ids ``[n_sequences,
    seq_len]`` drawn from the training split of the stage's ``tokens`` input."""

    needs_calibration = False

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        raise NotImplementedError

    def with_activations(self, quantized: QuantizedModel) -> QuantizedModel:
        """Add the ``activations`` param's dynamic activation quantization to a weight result."""
        act = getattr(self.params, "activations", None)
        if act is None:
            return quantized
        if quantized.meta.get("activations"):
            raise QuantizationError(
                f"{self.key}: this method sets its own activation quantization; drop the `activations` param")
        from components.quant.activation import ActivationSpec  # activation.py imports this module

        modules = tuple(name.removesuffix(".weight") for name in quantized.meta["quantized_tensors"])
        spec = ActivationSpec(bits=act.bits, modules=modules, granularity=act.granularity,
                              symmetric=act.symmetric, format=act.format)
        quantized.meta["activations"] = spec.to_meta()
        return quantized

    def target_linears(self, model: PreTrainedModel) -> list[tuple[str, torch.nn.Linear]]:
        """The ``nn.Linear`` modules to quantize: inside the decoder blocks, filtered by ``targets``."""
        targets = getattr(self.params, "targets", None)
        found = []
        for name, module in model.named_modules():
            if not (isinstance(module, torch.nn.Linear) and name.startswith(BLOCK_PREFIX)):
                continue
            if targets is None or any(name == t or name.endswith("." + t) for t in targets):
                found.append((name, module))
        if not found:
            wanted = "nn.Linear modules" if targets is None else f"nn.Linear modules matching {targets}"
            raise QuantizationError(
                f"{self.key}: model {type(model).__name__} has no {wanted} under '{BLOCK_PREFIX}*'; "
                "nothing to quantize")
        return found

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
