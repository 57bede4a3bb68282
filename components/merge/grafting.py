"""Skill localization by model grafting (Panigrahi et al., ICML 2023, arXiv 2302.06600).

A fine-tune's skill lives in a tiny fraction of its parameters: learn a mask ``gamma`` so that the
grafted model ``theta_0 + gamma * (theta_ft - theta_0)`` keeps the fine-tuned behaviour, then keep
only the ``density`` fraction of parameters with the largest mask scores. Follows the reference
code (abhishekpanigrahi1996/Skill-Localization-by-grafting): ``gamma = sigmoid(S)``, ``S`` starts
at ``+sigmoid_bias`` on the top-magnitude ``density`` fraction of the task vector and
``-sigmoid_bias`` elsewhere (its ``sparsity_level`` init and ``sigmoid_bias=10``), and is trained
on the task loss (next-token loss on the fine-tune's own training blocks here), with an optional
L1 penalty on ``gamma``; the mask is binarized at the end.

Guesses, marked: the reference trains ``S`` with SGD at a very large learning rate for a few
epochs; here Adam (scale-free, so ``lr`` is in units of ``S``) for ``steps`` steps. The final
mask keeps the top ``density`` fraction of ``S`` over the whole model, so the grafted count is
exact. ``steps: 0`` returns the top-magnitude mask itself: the method without its learning.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.func import functional_call

from components.merge.base import MergeError, Merger, MergerParams, ScoreFn, StateDict, check_density
from components.registry import Paper


class Grafting(Merger):
    """theta_0 + m * (theta_ft - theta_0) with a learned binary mask m keeping ``density`` of the weights."""

    key = "graft"
    paper = Paper(title="Task-Specific Skill Localization in Fine-tuned Language Models",
                  url="https://arxiv.org/abs/2302.06600", arxiv="2302.06600")
    requires_base = True
    #: the merge stage passes the model and the fine-tune's training blocks (``use_training``)
    needs_training_blocks = True

    class Params(MergerParams):
        density: float = Field(0.01, description="fraction of the weights grafted from the fine-tune, in (0, 1]")
        steps: int = Field(100, ge=0, description="Adam steps on the mask scores (0: the top-magnitude mask)")
        lr: float = Field(0.5, gt=0, description="Adam learning rate on the scores S (guess; see the module docs)")
        batch_size: int = Field(8, ge=1, description="training blocks per step")
        sigmoid_bias: float = Field(10.0, gt=0, description="initial |S| (the reference's sigmoid_bias)")
        l1: float = Field(0.0, ge=0, description="weight of the mean of sigmoid(S) added to the loss")
        seed: int = Field(0, ge=0, description="the order of the training blocks")

        @field_validator("density")
        @classmethod
        def _density_range(cls, value):
            return check_density(value)

    def use_training(self, model: torch.nn.Module, blocks: np.ndarray) -> None:
        """The fine-tune's architecture (any weights; they are replaced) and its training blocks."""
        self._model, self._blocks = model, np.asarray(blocks)

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        if len(models) != 1:
            raise MergeError(f"{self.key}: grafts one fine-tune onto its base, got {len(models)} models")
        keys = [k for k, v in base.items() if v.is_floating_point()]
        taus = {k: (models[0][k].to(torch.float32) - base[k].to(torch.float32)) for k in keys}
        scores = self._initial_scores(taus)
        losses: list[float] = []
        if self.params.steps:
            model, blocks = getattr(self, "_model", None), getattr(self, "_blocks", None)
            if model is None or blocks is None or len(blocks) == 0:
                raise MergeError(f"{self.key}: learning the mask needs the model and the fine-tune's training blocks "
                                 "(use_training); the merge stage passes them")
            losses = self._learn(scores, base, taus, model, blocks)
        mask = self._top_mask(scores)
        grafted = sum(int(m.sum()) for m in mask.values())
        total = sum(m.numel() for m in mask.values())
        self.report = {"grafted_params": grafted, "grafted_fraction": grafted / total,
                       "mask_loss_first": losses[0] if losses else float("nan"),
                       "mask_loss_last": losses[-1] if losses else float("nan")}
        merged = {}
        for key, value in base.items():
            if key in mask:
                merged[key] = (value.to(torch.float32) + mask[key] * taus[key]).to(value.dtype)
            else:
                merged[key] = value.clone()
        return merged

    def _initial_scores(self, taus: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        top = self._top_mask({k: t.abs() for k, t in taus.items()})  # exactly k, ties by position
        bias = self.params.sigmoid_bias
        return {key: torch.where(top[key] > 0, bias, -bias).requires_grad_(True) for key in taus}

    def _learn(self, scores, base, taus, model, blocks) -> list[float]:
        p = self.params
        device = next(model.parameters()).device
        fixed = {k: v.to(device) for k, v in model.state_dict().items() if k not in scores}
        base32 = {k: base[k].to(device, torch.float32) for k in scores}
        taus = {k: t.to(device) for k, t in taus.items()}
        optimizer = torch.optim.Adam(list(scores.values()), lr=p.lr)
        rng = np.random.default_rng([p.seed, 23])
        losses = []
        model.eval()
        for _ in range(p.steps):
            rows = np.sort(rng.choice(len(blocks), size=min(p.batch_size, len(blocks)), replace=False))
            x = torch.from_numpy(blocks[rows].astype(np.int64)).to(device)
            gates = {k: torch.sigmoid(s) for k, s in scores.items()}
            params = {**fixed, **{k: base32[k] + gates[k] * taus[k] for k in scores}}
            loss = functional_call(model, params, args=(), kwargs={"input_ids": x, "labels": x}).loss
            if p.l1:
                loss = loss + p.l1 * torch.cat([g.flatten() for g in gates.values()]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if not all(np.isfinite(losses)):
            raise MergeError(f"{self.key}: the mask's training loss became non-finite; lower lr (now {p.lr})")
        return losses

    def _top_mask(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = torch.cat([s.detach().flatten() for s in scores.values()])
        k = max(1, int(self.params.density * flat.numel()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True  # exactly k, ties by position
        out, start = {}, 0
        for key, s in scores.items():
            out[key] = keep[start:start + s.numel()].reshape(s.shape).to(torch.float32)
            start += s.numel()
        return out
