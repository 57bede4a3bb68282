"""Export a quantize artifact as compressed-tensors (``pack-quantized``), llm-compressor's format.

A quantize artifact keeps two views of its weights: ``model.safetensors`` holds the dequantized
fp32 weights (so any ``transformers`` loads it), and ``quantized.safetensors`` holds the packed
integer codes, scales and zero points (``components/quant/base.py``). This module writes the
second view in the format ``transformers`` loads *as quantized* (``CompressedTensorsHfQuantizer``,
with a ``quantization_config`` in ``config.json``) and vLLM serves: int32-packed codes plus
``weight_scale``/``weight_zero_point`` per Linear. The codes are the artifact's own: nothing is
re-quantized, and the export is checked to decode to exactly the artifact's weights.

Integer weight grids of 1 to 8 bits, per tensor, per channel or per group, convert: symmetric
grids as ``pack-quantized`` (codes packed into int32), asymmetric ones as ``int-quantized``
(one int8 per code), because compressed-tensors 0.20.1 packs asymmetric zero points in a shape
its own loader in transformers does not read back. Binary weights (the ``sign`` format, one bit
each) go out on the 2-bit symmetric grid, the narrowest compressed-tensors int grid that holds
both -1 and +1. Minifloat grids and activation quantization (WxAy) do not have a compressed-tensors
equivalent here; exporting them is refused with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from components.model.presets import load_model
from components.quant.base import decode_packed
from tasks.model_io import SIDE_MODULES

QUANTIZED_FILE = "quantized.safetensors"
PACKED, UNPACKED = "pack-quantized", "int-quantized"
STRATEGIES = {"per_tensor": "tensor", "per_channel": "channel", "group": "group"}


class ExportFormatError(ValueError):
    """An artifact that cannot be written in the asked export format."""


def _grid(name: str, spec: dict) -> tuple:
    """The compressed-tensors weight args of one tensor, as a hashable key that groups tensors."""
    fmt = spec.get("format", "int")
    if fmt == "sign":  # ±scale: codes ±1 on the symmetric 2-bit grid [-2, 1]
        return (2, STRATEGIES[spec["granularity"]], None, True)
    if fmt != "int":
        raise ExportFormatError(f"{name} is quantized to the {fmt!r} grid; compressed-tensors export here covers "
                                "integer grids only (export it without --format to get the fp32 model)")
    if spec["granularity"] not in STRATEGIES:
        raise ExportFormatError(f"{name}: granularity {spec['granularity']!r} has no compressed-tensors strategy")
    return (int(spec["bits"]), STRATEGIES[spec["granularity"]], spec.get("group_size"), bool(spec["symmetric"]))


def quantization_layout(facts: dict, source: Path) -> dict[tuple, list[str]]:
    """{weight grid: [Linear module names]} from a quantize artifact's ``paperdag.json`` facts."""
    side = [key for key in SIDE_MODULES if facts.get(key)]
    if side:  # the weights load into a plain Llama without the layers the model computes with
        raise ExportFormatError(f"{source} has modules beside its weights ({', '.join(side)}): compressed-tensors "
                                "would hold only the weights, which are not this model; export it without --format")
    quant = facts.get("quantization")
    if not quant or not quant.get("tensors"):
        raise ExportFormatError(f"{source} is not a quantized model artifact (no quantization facts); "
                                "--format compressed-tensors exports quantize stages")
    if quant.get("activations"):
        raise ExportFormatError(f"{source} also quantizes activations (W{quant.get('bits')}A"
                                f"{quant['activations'].get('bits')}); the export here writes weight-only "
                                "compressed-tensors, which would silently drop the activation grid")
    groups: dict[tuple, list[str]] = {}
    for name, spec in sorted(quant["tensors"].items()):
        groups.setdefault(_grid(name, spec), []).append(name.removesuffix(".weight"))
    return groups


def _ct_tensors(packed: dict[str, torch.Tensor], name: str, spec: dict) -> dict[str, torch.Tensor]:
    """A Linear's weight (dequantized), weight_scale and weight_zero_point in compressed-tensors'
    shapes and sign convention (signed codes: ``weight = (q - zero_point) * scale`` with a
    symmetric grid's zero point 0)."""
    bits = int(spec["bits"])
    scales = packed[f"{name}.scales"].to(torch.float32)
    if spec["symmetric"]:
        zero = torch.zeros_like(scales)
    else:  # compressed-tensors stores the asymmetric zero point on the signed grid
        zero = packed[f"{name}.zeros"].to(torch.float32) - 2 ** (bits - 1)
    if spec["granularity"] == "per_tensor":
        scales, zero = scales.reshape(1), zero.reshape(1)
    weight = decode_packed(packed, name, spec)
    return {"weight": weight, "weight_scale": scales, "weight_zero_point": zero.to(torch.int8)}


def export_compressed_tensors(artifact_dir: Path, dest: Path) -> None:
    """Write ``artifact_dir`` (a quantize artifact) to the new directory ``dest`` as
    compressed-tensors (pack-quantized, or int-quantized for asymmetric grids), with the
    tokenizer beside it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoTokenizer

    facts = json.loads((artifact_dir / "paperdag.json").read_text())
    layout = quantization_layout(facts, artifact_dir)
    specs = facts["quantization"]["tensors"]
    model = load_model(artifact_dir)
    model.config.paperdag_quantization = None  # the compressed-tensors config replaces paperdag's own
    groups = {
        f"group_{i}": QuantizationScheme(
            targets=modules, format=PACKED if symmetric else UNPACKED,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                                     group_size=group_size if strategy == "group" else None))
        for i, ((bits, strategy, group_size, symmetric), modules) in enumerate(sorted(layout.items()))
    }
    apply_quantization_config(model, QuantizationConfig(config_groups=groups), show_progress=False)
    packed = load_file(str(artifact_dir / QUANTIZED_FILE))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, spec in specs.items():
            module = modules[name.removesuffix(".weight")]
            tensors = _ct_tensors(packed, name, spec)
            # the codes must be what the model computes with: a method that keeps a transform
            # outside the codes (a rotation folded elsewhere) would export a different model
            gap = (tensors["weight"] - module.weight).abs().max().item()
            if gap > 1e-5 * max(module.weight.abs().max().item(), 1e-12):
                raise ExportFormatError(f"{artifact_dir}: {name} decoded from its codes differs from the model's "
                                        f"weight by up to {gap:.3g}; the codes alone do not describe this model")
            for attr, value in tensors.items():
                getattr(module, attr).data = value.to(getattr(module, attr).dtype).reshape(getattr(module, attr).shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(dest), safe_serialization=True)
    compressor.update_config(str(dest))
    AutoTokenizer.from_pretrained(str(artifact_dir)).save_pretrained(str(dest))
