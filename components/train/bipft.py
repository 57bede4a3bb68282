"""BiPFT (Xing et al., AAAI 2024, arXiv 2312.08937): pretrain a binary transformer, weights and
activations, with low-rank estimators of the binarization residual in attention.

The network is ``components/model/binary_network.py``: binary (BWN) weights and binary inputs in
every block projection, binary queries, keys, values and attention probabilities, and, with
``estimators: true``, the five rank-1 full-precision maps the paper adds to each attention.
``estimators: false`` is the same binary network without them: the paper's baseline, and the
control of its claim. Every tensor of the binary network trains (its scales too) with the stage's
optimizer and schedule [guess: the reference pretrains by distilling from a full-precision BERT;
here the stage's own objective, causal LM loss, unless a recipe names a distill stage].

The artifact is the plain Llama holding the binary weights, plus the input shifts, scales and
estimators in ``auxiliary.safetensors`` and ``binary_network`` in its facts; loading installs
them again, so the evaluate stage scores the binary model. ``quantized.safetensors`` holds the
binary model as it would ship: each projection's signs at one bit per weight with its fp32
magnitude (the ``sign`` format of ``components/quant/base.py``), plus every side tensor in fp32,
all counted in ``quantization.packed_bytes``, which the evaluate stage reports as the size.
Stages that would save a new model from its weights alone (quantize, merge, further training)
refuse it.
"""
from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from components.model.binary_network import (
    BinaryLinear, has_binary_network, install_binary_network, remove_binary_network)
from components.quant.base import PackedWeights, QuantizedModel
from components.registry import Paper
from components.train.method import (
    TrainingMethod, block_linears, check_own_attention, forward_flops_per_token, unwrap)


class BiPFTTraining(TrainingMethod):
    """Train the binary network (with or without the residual estimators) on the stage's loss."""

    key = "bipft"
    paper = Paper(title="BiPFT: Binary Pre-trained Foundation Transformer with Low-rank Estimation of "
                  "Binarization Residual Polynomials", url="https://arxiv.org/abs/2312.08937", arxiv="2312.08937")
    one_process_only = "keeps the scales and estimators it trains beside the model, and only the training process holds them"
    quantizes_weights = True

    class Params(TrainingMethod.Params):
        estimators: bool = Field(True, description="Add the five rank-1 estimators of the binarization residual "
                                 "to every attention (BiPFT); false: the plain binary network (its baseline).")

        @model_validator(mode="after")
        def _own_attention(self):
            check_own_attention(self.attention, "bipft", "binary")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self._side: dict = {}

    def prepare(self, model: nn.Module) -> None:
        plain = unwrap(model)
        if has_binary_network(plain):
            raise ValueError("bipft: the input model is already a binary network")
        self._layers = install_binary_network(plain, self.params.estimators)

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """3x the forward, each binary projection counted as the dense matmul it runs here."""
        plain = unwrap(model)
        dense_equivalent = sum(m.in_features * m.out_features for m in plain.modules() if isinstance(m, BinaryLinear))
        return 3.0 * (forward_flops_per_token(model, seq_len) + 2.0 * dense_equivalent)

    def finalize(self, model: nn.Module) -> dict:
        """Fold the binary projections back and take the side tensors off (saved beside the model)."""
        plain = unwrap(model)
        self._side = {k: v.cpu() for k, v in remove_binary_network(plain).items()}
        plain.requires_grad_(True)
        estimator_params = sum(v.numel() for k, v in self._side.items() if ".estimate." in k)
        return {"binary_network": {"estimators": self.params.estimators}, "binary_layers": self._layers,
                "estimator_params": estimator_params}

    def auxiliary_tensors(self) -> dict:
        return dict(self._side)

    def pack(self, model: nn.Module) -> QuantizedModel:
        """The folded projections as sign bits with one magnitude each (BWN is per tensor), and the
        side tensors the binary model computes with, so ``packed_bytes`` is the binary model's real
        size beyond the full-precision embeddings, norms and head. Its ``bits_per_weight`` counts
        the side tensors too (they are the binary layers' own overhead), unlike a QAT model's."""
        store, state = PackedWeights(), {}
        for name, linear in sorted(block_linears(model).items()):
            weight = linear.weight.detach().float()
            store.add_sign(f"{name}.weight", weight, "per_tensor")
            state[f"{name}.weight"] = weight.clone()
        for name, tensor in sorted(self._side.items()):
            store.add_raw(name, tensor.float())
        side_bytes = sum(t.numel() * 4 for t in self._side.values())
        bits = max(t["bits"] for t in store.tensors.values())  # 2 where a weight kept an exact zero
        meta = store.meta("bipft", weight_format="binary", bits=bits, granularity="per_tensor", symmetric=True,
                          side_tensor_bytes=side_bytes)
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)
