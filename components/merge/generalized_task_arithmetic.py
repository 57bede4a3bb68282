"""Generalized task arithmetic: sparsify each task vector, optionally elect signs, then add to the base.

TIES, DARE (+ task arithmetic or + TIES) are settings of this one class, as in mergekit's
``GeneralizedTaskArithmeticMerge``: ``sparsification`` picks how each task vector tau_i = theta_i - theta_0
is thinned, ``sign_consensus`` whether only entries agreeing with the elected sign are combined.
"""
from __future__ import annotations

import hashlib
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from components.merge.base import (Merger, MergeError, MergerParams, ScoreFn, StateDict, check_density,
                                   merge_task_vectors, per_model)

Sparsification = Literal["none", "magnitude", "random_dare"]


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = max(1, floor(density * numel))`` largest-magnitude entries, zero the rest.

    floor() matches mergekit's and peft's ``int(density * numel)``; ties in magnitude go to the
    lower flat index (stable sort) so the result is deterministic.
    """
    n = tau.numel()
    k = max(1, int(density * n))
    if k >= n:
        return tau
    order = torch.argsort(tau.abs().flatten(), descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[order[:k]] = True
    return torch.where(keep.view(tau.shape), tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def dare_generator(seed: int, model_index: int, tensor_name: str) -> torch.Generator:
    """A generator seeded from (seed, model position, tensor name): masks do not depend on iteration order."""
    digest = hashlib.sha256(f"{seed}\0{model_index}\0{tensor_name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE, paper-exact: drop each entry with p = 1 - density, divide the kept ones by (1 - p) = density.

    mergekit's ``dare_*`` instead rescales the masked delta to keep its L1 norm
    (``rescaled_masked_tensor``); in expectation both preserve tau, entrywise they differ.
    """
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep.to(tau.device), tau / density, torch.zeros((), dtype=tau.dtype, device=tau.device))


def elect_and_combine(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES steps 2-3: elect sign(sum_i w_i tau_i) (0 counts as +), sum only the agreeing entries.

    With ``normalize`` the sum is divided by the summed weights of the agreeing entries (the
    "disjoint mean"); trimmed (zero) entries have sign 0 and never agree, so they are not counted.
    """
    total = torch.zeros_like(weighted[0])
    for wt in weighted:
        total += wt
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, wt in zip(weights, weighted):
        agree = torch.sign(wt) == elected
        mixed += torch.where(agree, wt, 0.0)
        divisor += agree.to(total.dtype) * w
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return mixed


class GeneralizedTaskArithmeticParams(MergerParams):
    scaling: float = Field(1.0, allow_inf_nan=False, description="lambda: multiplies the combined task vector")
    normalize: bool = Field(
        False, description="without sign consensus: rescale weights to sum 1; with sign consensus: divide "
                           "each entry by the summed weights of the models that agree with its elected sign")
    density: float | list[float] = Field(
        1.0, description="fraction of each task vector's entries kept, in (0, 1]; one value or one per model")

    @field_validator("density")
    @classmethod
    def _density_range(cls, value):
        return check_density(value)


class GeneralizedTaskArithmetic(Merger):
    """theta = theta_0 + lambda * combine_i(w_i * sparsify(theta_i - theta_0)).

    Subclasses fix ``sparsification`` ("none", "magnitude" = TIES trim, "random_dare" = DARE drop)
    and ``sign_consensus`` (TIES sign election + disjoint sum). Math is in float64 per tensor and cast
    back; integer buffers come from the base.
    """

    Params = GeneralizedTaskArithmeticParams
    requires_base = True
    sparsification: ClassVar[Sparsification] = "none"
    sign_consensus: ClassVar[bool] = False

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        normalize = self.params.normalize
        # with sign consensus the normalization is per entry (disjoint mean), not of the weights up front
        weights = self.resolve_weights(len(models), default=1.0, normalize=normalize and not self.sign_consensus)
        if self.sign_consensus and normalize:
            bad = [(n, w) for n, w in zip(names, weights) if w <= 0]
            if bad:
                raise MergeError(f"{self.key}: with normalize=true (disjoint mean) every weight must be > 0; "
                                 f"got {', '.join(f'{n!r}: {w}' for n, w in bad)}")
        densities = per_model(getattr(self.params, "density", 1.0), len(models), "density", self.key)
        self.report = {"weights": dict(zip(names, weights)), "density": dict(zip(names, densities))}

        def sparsify_and_combine(key: str, theta0: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
            for i, density in enumerate(densities):
                taus[i] = self._sparsify(taus[i], density, i, key)  # in place: the raw tau is freed right away
            if self.sign_consensus:
                combined = elect_and_combine([w * tau for w, tau in zip(weights, taus)], weights, normalize)
            else:
                combined = torch.zeros_like(theta0)  # same accumulation as TaskArithmetic: bit-identical at density 1
                for w, tau in zip(weights, taus):
                    combined += w * tau
            return self.params.scaling * combined

        return merge_task_vectors(base, models, sparsify_and_combine)

    def _sparsify(self, tau: torch.Tensor, density: float, model_index: int, key: str) -> torch.Tensor:
        if self.sparsification == "none" or density >= 1.0:
            return tau
        if self.sparsification == "magnitude":
            return magnitude_trim(tau, density)
        return dare_drop(tau, density, dare_generator(self.params.seed, model_index, key))
