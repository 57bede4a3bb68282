"""quantize stage: a model that plain transformers loads (dequantized weights) plus the
packed low-bit tensors in ``quantized.safetensors`` and their real byte size."""
from __future__ import annotations

from components.quant.base import QuantizationError
from tasks.model_io import load_model_artifact, save_model_artifact


def run(ctx) -> dict:
    source = ctx.input("model")
    if source.kind == "quantize":
        raise QuantizationError(
            f"stage {ctx.plan.name}: input {source.manifest.get('stage')} ({source.path}) is already quantized; "
            "point `inputs.model` at the full-precision model instead")
    model, tokenizer, parent_facts = load_model_artifact(source)
    quantized = ctx.method.quantize(model)
    quantized.load_into(model)
    quantized.save_packed(ctx.out_dir / "quantized.safetensors")
    facts = {"kind": "quantize", "method": ctx.plan.method, "quantization": quantized.meta,
             "bits": quantized.meta.get("bits"), "parents": {"model": parent_facts}}
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    ctx.facts.update(bits=quantized.meta.get("bits"), packed_bytes=quantized.meta.get("packed_bytes"))
    packed_file = (ctx.out_dir / "quantized.safetensors").stat().st_size
    return {"bits": quantized.meta["bits"], "bits_per_weight": quantized.meta["bits_per_weight"],
            "packed_bytes": quantized.meta["packed_bytes"], "packed_file_bytes": packed_file,
            "fp32_bytes_of_quantized": quantized.meta["fp32_bytes_of_quantized"]}
