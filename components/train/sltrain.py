"""SLTrain: pretrain each block projection as a low-rank product plus a fixed-support sparse matrix.

SLTrain (Han et al., NeurIPS 2024) replaces a weight ``W`` (out x in) by
``W = (alpha / rank) * B @ A + S``: ``A`` (rank x in) Kaiming-uniform, ``B`` (out x rank) zeros,
and ``S`` nonzero on a random support of ``sparse_ratio * out * in`` entries, drawn once and
never changed, with values ~ U(+-1/sqrt(in)). Only ``A``, ``B`` and the values of ``S`` train;
there is no dense ``W``. Read from the official code (``andyjm3/SLTrain``,
``splora/splora_linear.py``): the low-rank part learns the head of the spectrum, the sparse
part the tail. The paper's 60M setting is rank 128 (a quarter of the width), ``sparse_ratio``
0.03 and ``alpha`` 32.

``sparse_ratio: 0`` is the low-rank-only baseline (``W = B @ A``, with ``B`` Kaiming-initialised
too: a zero ``B`` and no ``S`` would leave the blocks dead), and ``train_sparse: false``
keeps ``S`` at its random values: both are settings of this one class. The official code runs
a custom C++ sparse kernel; here each forward materialises ``W`` densely (``index_add`` of the
sparse values into ``B @ A``), so parameters and optimizer state shrink as in the paper but the
matmul FLOPs and activation memory do not; the FLOPs are counted as dense. When training ends,
``finalize`` folds every layer back into a plain ``nn.Linear`` holding ``W``: the artifact is an
ordinary ``LlamaForCausalLM``.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from components.registry import Paper
from components.train.replacement import FoldableLinear, LinearReplacement


class SLTrainError(ValueError):
    """SLTrain params that cannot apply to the model (a rank above a layer's smaller side)."""


class SparseLowRankLinear(FoldableLinear):
    """``y = x ((alpha / rank) B A + S)ᵀ + bias`` with ``S`` on a fixed random support."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, sparse_ratio: float, train_sparse: bool):
        super().__init__(linear)
        device, dtype = linear.weight.device, linear.weight.dtype
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        if sparse_ratio == 0:
            # Without S a zero B makes every block's output and every block gradient zero: a saddle the
            # low-rank-only model never leaves (measured: B stayed exactly 0 over 1000 steps). So the
            # low-rank baseline starts B like A, as a plain factorised layer W = B A would.
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        n_sparse = int(sparse_ratio * self.in_features * self.out_features)
        support = torch.randperm(self.in_features * self.out_features, device=device)[:n_sparse].sort().values
        self.register_buffer("sparse_index", support)
        bound = 1 / math.sqrt(self.in_features)
        self.sparse_value = nn.Parameter(torch.empty(n_sparse, device=device, dtype=dtype).uniform_(-bound, bound),
                                         requires_grad=train_sparse)

    def effective_weight(self) -> torch.Tensor:
        low_rank = self.scale * (self.lora_B @ self.lora_A)
        if self.sparse_value.numel() == 0:
            return low_rank
        # under bf16 autocast B @ A comes out in bf16: the sparse values join it in that dtype
        values = self.sparse_value.to(low_rank.dtype)
        return low_rank.flatten().index_add(0, self.sparse_index, values).view_as(low_rank)


class SLTrain(LinearReplacement):
    key = "sltrain"
    paper = Paper(title="SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
                  url="https://arxiv.org/abs/2406.02214", arxiv="2406.02214")

    class Params(LinearReplacement.Params):
        rank: int = Field(128, ge=1, description="Rank of B @ A (the paper: 128 for its 60M model of width 512).")
        alpha: float = Field(32.0, gt=0, description="B @ A is scaled by alpha / rank (the paper: 32).")
        sparse_ratio: float = Field(0.03, ge=0, lt=1, description="Share of each matrix's entries on the sparse "
                                    "support (the paper's delta: 0.03); 0 is low-rank only.")
        train_sparse: bool = Field(True, description="Train the sparse values; false keeps them at their random "
                                   "initialisation (a control: is it learning S that helps, or its full rank?).")

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        targets = self.targets(model)
        narrow = {name: min(m.in_features, m.out_features) for name, m in targets.items()
                  if p.rank > min(m.in_features, m.out_features)}
        if narrow:
            name, width = sorted(narrow.items())[0]
            raise SLTrainError(f"params.rank={p.rank} is larger than layer {name} allows (min(in, out) = {width})")
        self.replace(model, targets, lambda linear: SparseLowRankLinear(linear, p.rank, p.alpha, p.sparse_ratio,
                                                                        p.train_sparse))

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        factor_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in replaced.values())
        sparse_params = sum(m.sparse_value.numel() for m in replaced.values())
        return {"sltrain_rank": self.params.rank, "sltrain_sparse_ratio": self.params.sparse_ratio,
                "sltrain_layers": len(replaced), "sltrain_factor_params": factor_params,
                "sltrain_sparse_params": sparse_params}
