"""quantize stage: a model that plain transformers loads (dequantized weights) plus the
packed low-bit tensors in ``quantized.safetensors`` and their real byte size.

Calibrated methods draw their calibration sequences from the training split of the stage's
``tokens`` input. Weight+activation methods also write ``activation.safetensors``; the
evaluate stage then quantizes activations through hooks (components/quant/activation.py).
"""
from __future__ import annotations

from safetensors.torch import save_file

from components.model.health import check_model_health
from components.quant.activation import ACTIVATION_FILE
from components.quant.base import QuantizationError
from tasks.calibration import model_and_calibration
from tasks.model_io import save_model_artifact


def run(ctx) -> dict:
    source = ctx.input("model")
    if source.kind == "quantize":
        raise QuantizationError(
            f"stage {ctx.plan.name}: input {source.manifest.get('stage')} ({source.path}) is already quantized; "
            "point `inputs.model` at the full-precision model instead")
    method = ctx.method
    model, tokenizer, parent_facts, calibration = model_and_calibration(ctx, QuantizationError)
    if getattr(method, "reads_input_codes", False):  # re-encodes the input's codes (bit_switch)
        from components.quant.bit_switch import read_packed

        packed_file = source.path / "quantized.safetensors"  # verified with the artifact above
        method.use_input_codes(read_packed(packed_file), parent_facts.get("quantization", {}),
                               source=str(packed_file))
    quantized = method.with_activations(method.quantize(model, calibration))
    quantized.load_into(model)
    check_model_health(model, f"stage {ctx.plan.name}: the quantized model ({ctx.plan.method})")
    quantized.save_packed(ctx.out_dir / "quantized.safetensors")
    if quantized.activation_state or quantized.meta.get("activations"):
        save_file({k: v.contiguous() for k, v in quantized.activation_state.items()},
                  str(ctx.out_dir / ACTIVATION_FILE))
    meta = quantized.meta
    facts = {"kind": "quantize", "method": ctx.plan.method, "quantization": meta,
             "bits": meta.get("bits"), "parents": {"model": parent_facts}}
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    ctx.facts.update(bits=meta.get("bits"), packed_bytes=meta.get("packed_bytes"))
    packed_file = (ctx.out_dir / "quantized.safetensors").stat().st_size
    metrics = {"bits_per_weight": meta["bits_per_weight"], "packed_bytes": meta["packed_bytes"],
               "packed_file_bytes": packed_file, "fp32_bytes_of_quantized": meta["fp32_bytes_of_quantized"]}
    if isinstance(meta.get("bits"), (int, float)):
        metrics["bits"] = meta["bits"]
    if meta.get("activations"):
        metrics["activation_bits"] = meta["activations"]["bits"]
    metrics.update(meta.get("metrics", {}))  # method-specific numbers (e.g. per-layer MSE, bit allocation)
    return metrics
