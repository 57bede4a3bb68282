"""Bit switching of a Double Rounding model: its stored highest-bit integer codes re-rounded to a
lower width, with no full-precision weight involved (Huang et al., 2025, "Nearly Lossless
Adaptive Bit Switching", arXiv 2502.01199).

A ``double_rounding`` training stage stores, per block projection, ``h``-bit codes ``q_h`` and one
step ``s`` per output channel (``W = q_h * s``). Its ``b``-bit model is the second rounding

    q_b = clamp(round(q_h / 2^(h-b)), -(2^(b-1) - 1), 2^(b-1) - 1),    W_b = q_b * (2^(h-b) * s)

on the project's symmetric integer grids (``int_range``: 2 bits are {-1, 0, 1}), by the same
function (``double_round``) that the joint training runs in its forward pass, so the switched
model is exactly the one that was trained at width ``b``. This quantizer reads only the input
artifact's packed codes and steps (``quantized.safetensors``); it refuses any other input, and an
input whose weights are not what its packed file dequantizes to.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from pydantic import Field
from safetensors.torch import load_file
from transformers import PreTrainedModel

from components.quant.base import PackedWeights, QuantizationError, QuantizedModel, Quantizer, dequantize_packed
from components.quant.fake_quant import int_range
from components.registry import Paper

DOUBLE_ROUNDING_PAPER = Paper(title="Nearly Lossless Adaptive Bit Switching", url="https://arxiv.org/abs/2502.01199",
                              arxiv="2502.01199")
STORED_SCHEME = "double_rounding"  # the packed format a double_rounding training stage writes


def double_round(codes: torch.Tensor, from_bits: int, to_bits: int,
                 rounding: Callable[[torch.Tensor], torch.Tensor] = torch.round) -> torch.Tensor:
    """``from_bits`` integer codes re-rounded to ``to_bits``: ``clamp(round(q / 2^(from-to)))`` on the
    symmetric ``to_bits`` range; their step is ``2^(from-to)`` times the stored one. ``rounding``:
    ``round_ste`` while training (straight-through), ``torch.round`` when switching; both round
    halves to even, so training and switching agree bit for bit."""
    if to_bits == from_bits:
        return codes
    qmin, qmax = int_range(to_bits, symmetric=True)
    return torch.clamp(rounding(codes / 2 ** (from_bits - to_bits)), qmin, qmax)


def read_packed(path) -> dict[str, torch.Tensor]:
    """The packed tensors ``QuantizedModel.save_packed`` wrote to ``path`` (their meta is the
    artifact's ``quantization`` fact)."""
    if not os.path.exists(path):
        raise QuantizationError(f"{path} does not exist: the input model stores no packed low-bit codes")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise QuantizationError(f"cannot read packed codes {path}: {type(e).__name__}: {e}") from None


class BitSwitch(Quantizer):
    key = "bit_switch"
    #: the quantize stage hands a method with this flag its input's packed file (``use_input_codes``)
    reads_input_codes = True
    paper = DOUBLE_ROUNDING_PAPER

    class Params(Quantizer.Params):
        bits: int = Field(4, ge=2, le=8, description="Width to switch to; at most the width the input stores.")

    def use_input_codes(self, packed: dict[str, torch.Tensor], meta: dict, source: str) -> None:
        """Called before ``quantize`` with the input model's packed tensors, read from ``source``
        (its ``quantized.safetensors``), and their meta (the input's ``quantization`` fact)."""
        scheme = meta.get("scheme")
        if scheme != STORED_SCHEME:
            raise QuantizationError(
                f"bit_switch re-rounds the stored codes of a double_rounding model; input {source} holds "
                f"{f'{scheme!r} codes' if scheme else 'no packed codes'}; point `inputs.model` at a "
                "double_rounding training stage")
        if self.params.bits > meta["bits"]:
            raise QuantizationError(f"params.bits={self.params.bits} is above the {meta['bits']} bits input {source} "
                                    "stores; bit switching only goes down")
        self.source, self.packed, self.stored = source, packed, meta

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        if not hasattr(self, "stored"):
            raise QuantizationError("bit_switch: call use_input_codes with the input's packed file first")
        bits, stored_bits = self.params.bits, self.stored["bits"]
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store = PackedWeights()
        for name, info in sorted(self.stored["tensors"].items()):
            shape = tuple(info["shape"])
            stored = dequantize_packed(self.packed, name, shape, stored_bits, info["zero_point"])
            if name not in state or not torch.allclose(state[name].float(), stored, rtol=1e-6, atol=0):
                raise QuantizationError(f"{self.source}: {name} is not what its packed codes dequantize to; the "
                                        "artifact was changed after training")
            scale = self.packed[f"{name}.scales"].float()
            codes = torch.round(stored / scale.reshape(-1, 1))
            switched = double_round(codes, stored_bits, bits)
            step = scale * 2 ** (stored_bits - bits)
            state[name] = (switched * step.reshape(-1, 1)).to(state[name].dtype)
            store.add_int(name, shape, (switched + 2 ** (bits - 1)).to(torch.uint8), step, None, bits,
                          "per_channel", None, True)
        # a width the joint training did not run is switchable too, but nothing trained it
        trained = bits in self.stored.get("bit_widths", [])
        meta = store.meta("bit_switch", bits=bits, source_bits=stored_bits, trained_width=trained,
                          granularity="per_channel", group_size=None, symmetric=True, zero_point=2 ** (bits - 1))
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)
