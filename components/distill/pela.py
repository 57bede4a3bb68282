"""PELA: a pretrained model made low-rank by truncated SVD, then trained further with feature
distillation from the original (Guo et al., CVPR 2024, "PELA: Learning Parameter-Efficient Models
with Low-Rank Approximation", arXiv 2310.10700).

Read from the official code (``guoyang9/PELA``, ``DeiT/low_rank.py``, ``DeiT/engine.py``,
``ALBEF/models/model_pretrain.py``); nothing was copied:
- every targeted block projection ``W`` (out x in) becomes two Linears, ``W ~ up @ down`` with
  ``down = sqrt(S_r) Vh_r`` (r x in) and ``up = U_r sqrt(S_r)`` (out x r) from the SVD of ``W``; the
  rank is ``(in * out) // (compression_ratio * (in + out))``, so each layer keeps about
  ``1 / compression_ratio`` of its parameters (DeiT's default ratio: 2). The bias stays on ``up``.
  The forward runs the two thin matmuls, so the low-rank model is also cheaper to run;
- the student (the factorized model, every parameter trainable) minimizes the hard-label loss
  plus ``feature_weight`` times the mean over every block of the MSE between its block output and
  the original model's, all tokens, before the final norm (DeiT: weight 1; ALBEF: 0.1);
- the paper's "weight perturbation" regularizer is, in the code, no noise: it is
  ``(max|up @ down - W_original| - eps)^2`` averaged over the factorized layers (``inf_norm_weight``;
  off in the DeiT scripts, 1 in ALBEF and Swin). It is implemented with the same definition.

``feature_weight: 0`` is SVD alone, trained for the same steps: the paper's comparison. On save
every factorized layer is folded into one plain Linear holding ``up @ down`` (rank ``r``), so the
artifact is an ordinary ``LlamaForCausalLM`` with the dense shapes: the parameter saving is in
the facts (``low_rank_params``), not in the file size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.distill.feature_kd import FeatureKD, llama_layers
from components.registry import Paper
from components.train.method import TrainingMethod, forward_flops_per_token, unwrap
from components.train.replacement import FoldableLinear, LinearReplacement


class PelaError(ValueError):
    """A compression ratio that leaves a layer no rank."""


def pela_rank(in_features: int, out_features: int, compression_ratio: float) -> int:
    """PELA's rank rule: ``r (in + out) ~ in * out / compression_ratio`` parameters."""
    return int((in_features * out_features) // (compression_ratio * (in_features + out_features)))


class SvdLowRankLinear(FoldableLinear):
    """``y = (x down^T) up^T + bias``, initialised from the truncated SVD of ``linear.weight``."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__(linear)
        weight = linear.weight.detach()
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[:rank].sqrt()
        # contiguous: DeepSpeed broadcasts parameters through a byte view
        self.down = nn.Parameter((root.unsqueeze(1) * vh[:rank]).to(weight.dtype).contiguous())
        self.up = nn.Parameter((u[:, :rank] * root).to(weight.dtype).contiguous())

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def effective_weight(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype), self.bias)


def factor_params(modules) -> int:
    """Parameters of the factor pairs of ``SvdLowRankLinear`` modules: ``r (in + out)`` each."""
    return sum(m.rank * (m.in_features + m.out_features) for m in modules)


class Pela(FeatureKD, LinearReplacement):
    key = "pela"
    paper = Paper(title="PELA: Learning Parameter-Efficient Models with Low-Rank Approximation",
                  url="https://arxiv.org/abs/2310.10700", arxiv="2310.10700")

    class Params(FeatureKD.Params, LinearReplacement.Params):
        compression_ratio: float = Field(2.0, gt=1, description="Each factorized layer keeps about 1/ratio of its "
                                         "parameters: rank = in*out // (ratio * (in + out)) (DeiT's default: 2).")
        inf_norm_weight: float = Field(0.0, ge=0, description="Weight of the regularizer (max|up@down - W_original| "
                                       "- inf_norm_eps)^2, mean over layers (off in PELA's DeiT scripts, 1 in ALBEF).")
        inf_norm_eps: float = Field(1e-3, ge=0, description="The regularizer's target for the largest residual entry.")

    def runs_teacher(self) -> bool:
        return self.params.feature_weight > 0 or self.params.alpha > 0

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        ratio, targets = self.params.compression_ratio, self.targets(model)
        ranks = {name: pela_rank(m.in_features, m.out_features, ratio) for name, m in targets.items()}
        empty = sorted(name for name, rank in ranks.items() if rank < 1)
        if empty:
            raise PelaError(f"params.compression_ratio={ratio} leaves layer {empty[0]} no rank "
                            f"({targets[empty[0]].in_features} -> {targets[empty[0]].out_features})")
        self.replace(model, targets, lambda linear: SvdLowRankLinear(
            linear, pela_rank(linear.in_features, linear.out_features, ratio)))

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        if not self.runs_teacher():
            return  # SVD alone: plain training, the teacher (if given) is never run
        super().bind(model, teacher, n_blocks)
        if self.params.layer_map is None:  # PELA distills every block's output
            self._layer_map = {layer: layer for layer in range(1, len(llama_layers(model)) + 1)}

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        loss = super().loss(model, batch, teacher) if self.runs_teacher() else \
            TrainingMethod.loss(self, model, batch, teacher)
        if self.params.inf_norm_weight > 0:
            loss = loss + self.params.inf_norm_weight * self.residual_penalty(model, teacher)
        return loss

    def residual_penalty(self, model: nn.Module, teacher: nn.Module | None) -> torch.Tensor:
        """Mean over factorized layers of ``(max|up @ down - W_original| - eps)^2``."""
        if teacher is None:
            raise ValueError("pela: inf_norm_weight > 0 compares with the original weights; add a `teacher` input")
        eps, terms = self.params.inf_norm_eps, []
        for name, module in self.replaced(model).items():
            original = unwrap(teacher).get_submodule(name).weight
            terms.append(((module.effective_weight() - original).abs().max() - eps) ** 2)
        return torch.stack(terms).mean()

    def low_rank_flops(self, model: nn.Module) -> float:
        """Forward FLOPs per token of the factorized layers (two thin matmuls each)."""
        return 2.0 * factor_params(self.replaced(model).values())

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """The student's training (its plain Linears plus the thin matmuls) and, when the teacher
        runs, its forward over every block (``FeatureKD``'s count)."""
        student = 3.0 * (forward_flops_per_token(model, seq_len) + self.low_rank_flops(model))
        if not self.runs_teacher():
            return student
        return FeatureKD.flops_per_token(self, model, seq_len, teacher) + 3.0 * self.low_rank_flops(model)

    def finalize(self, model: nn.Module) -> dict:
        replaced = self.fold_back(model)
        facts = super().finalize(model) if self.runs_teacher() else {}
        dense = sum(m.in_features * m.out_features for m in replaced.values())
        return {**facts, "pela_compression_ratio": self.params.compression_ratio, "pela_layers": len(replaced),
                "pela_ranks": {name: m.rank for name, m in sorted(replaced.items())},
                "low_rank_params": factor_params(replaced.values()), "replaced_dense_params": dense}
