"""On-disk size, parameter count, sparsity and bits per weight of a saved model."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

# 2-D weights of the decoder blocks: the Linear layers that pruning and quantization touch.
BLOCK_LINEAR = re.compile(r"^model\.layers\.\d+\..*\.weight$")


def _weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(f"{model_dir}: no model.safetensors (or model-*-of-*.safetensors shards)")


def model_size_report(model_dir: Path, packed_bytes: int | None = None, quant_meta: dict | None = None) -> dict:
    """Sizes of the model saved in ``model_dir``, read from its safetensors without building it.

    - ``safetensors_bytes``: real bytes of the weight file(s).
    - ``n_params``: total elements of all stored tensors.
    - ``sparsity``: fraction of exact zeros in the decoder blocks' 2-D (Linear) weights.
    - ``bits_per_weight``: the stored dtype's width (32 for fp32), or the quantized width from
      ``quant_meta["bits_per_weight"]`` (scales included).
    - ``deploy_bytes``: file bytes with quantized tensors counted at their packed size
      (``safetensors_bytes`` when not quantized).
    """
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    file_bytes = sum(f.stat().st_size for f in files)
    n_params = 0
    block_weights = 0
    block_zeros = 0
    dtype_bits: set[int] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                n_params += numel
                if len(shape) == 2 and BLOCK_LINEAR.match(name):
                    tensor = f.get_tensor(name)
                    block_weights += numel
                    block_zeros += int((tensor == 0).sum())
                    dtype_bits.add(torch.finfo(tensor.dtype).bits if tensor.is_floating_point()
                                   else torch.iinfo(tensor.dtype).bits)

    if quant_meta is not None:
        bits_per_weight = float(quant_meta["bits_per_weight"])
        if packed_bytes is None:
            packed_bytes = int(quant_meta["packed_bytes"])
        deploy_bytes = file_bytes - int(quant_meta["fp32_bytes_of_quantized"]) + packed_bytes
    else:
        if len(dtype_bits) > 1:
            raise ValueError(f"{model_dir}: block weights mix dtypes of {sorted(dtype_bits)} bits")
        bits_per_weight = float(dtype_bits.pop()) if dtype_bits else 32.0
        deploy_bytes = file_bytes if packed_bytes is None else packed_bytes
    return {
        "safetensors_bytes": file_bytes,
        "n_params": n_params,
        "sparsity": block_zeros / block_weights if block_weights else 0.0,
        "bits_per_weight": bits_per_weight,
        "packed_bytes": packed_bytes,
        "deploy_bytes": deploy_bytes,
    }
