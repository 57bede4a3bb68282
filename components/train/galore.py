"""GaLore: full-parameter training with Adam moments kept in a low-rank projection of the gradient.

GaLore (Zhao et al., ICML 2024) trains every weight, but for each targeted matrix ``W`` (m x n)
it keeps Adam's two moments on ``R = Pᵀ G`` instead of the full gradient ``G``. ``P`` holds the
top-``rank`` singular vectors of ``G``, recomputed by SVD every ``update_proj_gap`` steps, on
the smaller side of the matrix: the right ones (``R = G Pᵀ``, m x r) when m >= n, else the left
ones (``R = Pᵀ G``, r x n). Adam's normalised update ``N`` is projected back (``P N`` or
``N P``) and multiplied by ``scale``. Optimizer state for such a matrix is then
``2 * r * max(m, n) + r * min(m, n)`` numbers instead of ``2 * m * n``.

Read from the official code (``jiaweizzhao/GaLore``, ``galore_torch/adamw.py`` and
``galore_projector.py``, proj_type ``std``) and matched step for step; ``benchmarks/bench_galore.py``
measures this optimizer against the ``galore-torch`` package on the same gradients:
- Adam with bias correction; ``eps`` is added to ``sqrt(v)``;
- the projection is refreshed when the parameter's step count (before the update) is a
  multiple of ``update_proj_gap``, from that step's gradient;
- decoupled weight decay is applied *after* the update (``p -= lr * wd * p``), as galore-torch
  does (torch's AdamW decays before it);
- matrices outside the targets (embeddings, ``lm_head``) and 1-D weights get plain Adam in
  the same optimizer, with the same lr.

The defaults follow the paper's pretraining setting (scale 0.25, gap 200); ``betas`` and ``eps``
default to the trainer's AdamW so that a comparison with ``dense`` differs in the projection
only. ZeRO partitions flatten parameters, which a per-matrix SVD cannot work on, so GaLore
needs ``zero_stage: 0``. The trained weights are ordinary: the artifact is a plain model.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from components.registry import Paper
from components.train.lora import ALL_PROJECTIONS, check_unique_names
from components.train.method import TrainingMethod, block_linears
from components.train.trainer import TrainConfig


class GaLoreError(ValueError):
    """GaLore params that cannot apply to the model (a rank above a matrix's smaller side)."""


def top_singular_vectors(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """``P`` of the projection: (rank x n) right singular vectors when m >= n, else (m x rank) left."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return vh[:rank] if grad.shape[0] >= grad.shape[1] else u[:, :rank]


def project(grad: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return grad @ projection.T if grad.shape[0] >= grad.shape[1] else projection.T @ grad


def project_back(low_rank: torch.Tensor, projection: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    return low_rank @ projection if full_shape[0] >= full_shape[1] else projection @ low_rank


class GaLoreAdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay; groups with a ``rank`` keep their moments projected.

    A group's keys: ``lr``, ``betas``, ``eps``, ``weight_decay`` and, for projected matrices,
    ``rank``, ``update_proj_gap`` and ``scale`` (``rank: None`` is plain AdamW). The state of a
    projected matrix holds its ``projection`` tensor, so ``state_dict`` carries everything a
    resume needs and the measured optimizer-state bytes include it.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=None, update_proj_gap=200,
                        scale=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rank"] is not None:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise GaLoreError(f"GaLore projects matrices only; a parameter of shape {tuple(p.shape)} "
                                          "is in a group with a rank")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                done = state.get("step", 0)
                grad = p.grad
                if group["rank"] is not None:
                    if "projection" not in state or done % group["update_proj_gap"] == 0:
                        state["projection"] = top_singular_vectors(grad, group["rank"])
                    grad = project(grad, state["projection"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                done += 1
                state["step"] = done
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** done) / (1.0 - beta1 ** done)
                if group["rank"] is not None:
                    update = project_back(update, state["projection"], p.shape).mul_(group["scale"])
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


class GaLoreTraining(TrainingMethod):
    key = "galore"
    paper = Paper(title="GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
                  url="https://arxiv.org/abs/2403.03507", arxiv="2403.03507")

    class Params(TrainingMethod.Params):
        rank: int = Field(128, ge=1, description="Rank r of the gradient projection (the paper: 128 for its 60M "
                          "model of width 512, i.e. a quarter of the width).")
        update_proj_gap: int = Field(200, ge=1, description="Steps between SVDs that refresh the projection.")
        scale: float = Field(0.25, gt=0, description="The projected-back update is multiplied by this.")
        betas: tuple[float, float] = Field((0.9, 0.95), description="Adam's betas (the trainer's AdamW defaults).")
        eps: float = Field(1e-8, gt=0, description="Added to sqrt of the second moment.")
        target_modules: tuple[str, ...] = Field(
            ALL_PROJECTIONS, min_length=1, description="Names of the Linears (inside the decoder blocks) whose "
            "weights are projected; as the paper, every attention and MLP projection.")

        _unique = field_validator("target_modules")(check_unique_names)

        @field_validator("betas")
        @classmethod
        def _betas_in_unit_interval(cls, betas):
            if not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"betas must each be in [0, 1), got {list(betas)}")
            return betas

        @model_validator(mode="after")
        def _no_zero_partitions(self):
            if self.zero_stage != 0:
                raise ValueError(f"zero_stage={self.zero_stage}: GaLore takes an SVD of each weight's gradient, "
                                 "and ZeRO flattens parameters into partitions; use zero_stage: 0")
            return self

    def optimizer(self, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        p = self.params
        targets = {name: linear.weight for name, linear in block_linears(model).items()
                   if name.rsplit(".", 1)[-1] in p.target_modules and linear.weight.requires_grad}
        if not targets:
            raise GaLoreError(f"params.target_modules {list(p.target_modules)} names no trainable Linear in the "
                              "decoder blocks")
        narrow = {name: min(w.shape) for name, w in targets.items() if p.rank > min(w.shape)}
        if narrow:
            name, width = sorted(narrow.items())[0]
            raise GaLoreError(f"params.rank={p.rank} is larger than layer {name} allows (min(out, in) = {width}); "
                              "the projection would not be low-rank")
        projected = {id(w) for w in targets.values()}
        rest = [w for w in model.parameters() if w.requires_grad and id(w) not in projected]
        groups = [{"params": list(targets.values()), "weight_decay": config.weight_decay, "rank": p.rank,
                   "update_proj_gap": p.update_proj_gap, "scale": p.scale},
                  {"params": [w for w in rest if w.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [w for w in rest if w.ndim < 2], "weight_decay": 0.0}]
        self._projected_matrices = len(targets)
        return GaLoreAdamW([g for g in groups if g["params"]], lr=config.lr, betas=p.betas, eps=p.eps)

    def finalize(self, model: nn.Module) -> dict:
        return {"galore_rank": self.params.rank, "galore_projected_matrices": getattr(self, "_projected_matrices", 0)}
