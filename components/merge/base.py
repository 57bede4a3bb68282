"""Weight-space merging of checkpoints that share an architecture (and usually a base model).

Mergers are pure tensor ops over state dicts: they never build a model. Float tensors are
combined in float64 and cast back to their dtype, so exact identities (a soup of identical
models, base + (theta - base)) hold bit for bit; integer buffers are copied, never averaged.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import Field, field_validator

from components.registry import Method, MethodParams

StateDict = dict[str, torch.Tensor]
# Held-out score of a candidate merged state dict; LOWER is better (e.g. held-out loss).
ScoreFn = Callable[[StateDict], float]
# (tensor name, reference tensor in float64, one float64 tensor per model) -> combined float64 tensor.
# For ``merge_task_vectors`` the reference is theta_0, the per-model tensors are the task vectors
# tau_i = theta_i - theta_0, and the result is the delta added to theta_0.
CombineFn = Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor]


class MergeError(ValueError):
    """Checkpoints or merge weights that cannot be combined."""


class MergerParams(MethodParams):
    weights: list[float] | None = Field(
        None, min_length=1,
        description="one weight per merged model, in the order the models are given; "
                    "None = the method's default")
    validation_domain: str | None = Field(
        None, description="methods that search (greedy soup, ComPEFT's alpha) score candidates on this domain's "
                          "validation blocks of the stage's `tokens` input; None = every domain")

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None:
            bad = [w for w in weights if not math.isfinite(w)]
            if bad:
                raise ValueError(f"weights must be finite, got {bad}")
        return weights


class Merger(Method):
    """Combines ``models`` (optionally relative to ``base``) into one state dict."""

    Params = MergerParams
    requires_base: bool = False
    #: True when the merged model has the base's shapes rather than the models' (the V-cycle
    #: interpolates a smaller model, de-coalesced, into the base).
    shaped_like_base: bool = False
    #: True when the merge stage must first measure every model's (and the base's) held-out loss on
    #: each model's training domain and pass them to ``measure(...)`` (group-wise merging by transfer).
    needs_domain_losses: bool = False
    #: True when the merge stage must pass the model and the fine-tune's training blocks to
    #: ``use_training(model, blocks)`` first (grafting learns its mask on the task loss).
    needs_training_blocks: bool = False

    def __init__(self, params: MethodParams | None = None):
        super().__init__(params)
        # What the last merge decided (kept ingredients, groups, compressed sizes...); the task logs it.
        self.report: dict[str, Any] = {}

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        """``score_fn`` (lower is better) is only used by methods that search, e.g. ``greedy_soup``."""
        raise NotImplementedError

    def resolve_weights(self, n_models: int, default: float, normalize: bool) -> list[float]:
        """Per-model weights from params (or ``default`` each), optionally scaled to sum to 1."""
        weights = self.params.weights
        if weights is None:
            weights = [default] * n_models
        elif len(weights) != n_models:
            raise MergeError(f"{self.key}: got {len(weights)} weights {list(weights)} for "
                             f"{n_models} models; give exactly one weight per model")
        if normalize:
            total = math.fsum(weights)
            if abs(total) < 1e-12 * max(1.0, max(abs(w) for w in weights)):
                raise MergeError(f"{self.key}: weights sum to 0 ({list(weights)}); cannot normalize them")
            weights = [w / total for w in weights]
        return list(weights)

    def check_inputs(self, base: StateDict | None, models: list[StateDict], names: list[str]) -> None:
        if self.requires_base and base is None:
            raise MergeError(f"{self.key}: needs the base (pre-trained) checkpoint, got base=None")
        check_compatible(base, models, names)


def _merge_float_tensors(reference: StateDict,
                         combine_tensor: Callable[[str, torch.Tensor], torch.Tensor]) -> StateDict:
    """The one loop every merger shares: integer buffers are copied from ``reference``; each float tensor
    is ``combine_tensor(name, reference tensor in float64)`` cast back to the reference's dtype."""
    merged: StateDict = {}
    for key, ref_tensor in reference.items():
        if not ref_tensor.is_floating_point():
            merged[key] = ref_tensor.clone()
            continue
        merged[key] = combine_tensor(key, ref_tensor.to(torch.float64)).to(ref_tensor.dtype)
    return merged


def merge_weights(reference: StateDict, models: list[StateDict], combine: CombineFn) -> StateDict:
    """Merge the models' weights themselves (soups): each float tensor is
    ``combine(name, reference64, [theta_i in float64])``; integer buffers come from ``reference``."""
    return _merge_float_tensors(
        reference, lambda key, ref64: combine(key, ref64, [sd[key].to(torch.float64) for sd in models]))


def merge_task_vectors(base: StateDict, models: list[StateDict], combine: CombineFn) -> StateDict:
    """theta = theta_0 + combine(name, theta_0, [theta_i - theta_0]) per float tensor, all in float64 and
    cast back to the base dtype; integer buffers come from ``base``. The task-vector list is built fresh
    per tensor, so ``combine`` may replace its entries (e.g. to free a raw tau once it is sparsified)."""
    return _merge_float_tensors(
        base, lambda key, theta0: theta0 + combine(key, theta0, [sd[key].to(torch.float64) - theta0
                                                                 for sd in models]))


def check_compatible(base: StateDict | None, models: list[StateDict], names: list[str]) -> None:
    """Raise ``MergeError`` naming the checkpoint and tensor where keys or shapes differ."""
    if not models:
        raise MergeError("no models to merge")
    if len(names) != len(models):
        raise MergeError(f"got {len(models)} models but {len(names)} names {names}")
    if base is not None:
        ref, ref_name = base, "base"
    else:
        ref, ref_name = models[0], names[0]
    for sd, name in zip(models, names):
        if sd is ref:
            continue
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            raise MergeError(f"checkpoint {name!r} does not match {ref_name!r}: " + "; ".join(parts))
        for key, tensor in sd.items():
            if tensor.shape != ref[key].shape:
                raise MergeError(f"checkpoint {name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                 f"but {ref_name!r} has {tuple(ref[key].shape)}")
            if tensor.is_floating_point() != ref[key].is_floating_point():
                raise MergeError(f"checkpoint {name!r}: tensor {key!r} has dtype {tensor.dtype}, "
                                 f"but {ref_name!r} has {ref[key].dtype}")


def check_density(value: float | list[float]) -> float | list[float]:
    """Pydantic validator body: every density must lie in (0, 1]."""
    values = value if isinstance(value, list) else [value]
    bad = [d for d in values if not (math.isfinite(d) and 0.0 < d <= 1.0)]
    if bad:
        raise ValueError(f"density must be in (0, 1] (the fraction of task-vector entries kept), got {bad}")
    return value


def per_model(value: float | list[float], n_models: int, what: str, key: str) -> list[float]:
    """Broadcast a scalar parameter to one value per model, or check a per-model list's length."""
    if isinstance(value, list):
        if len(value) != n_models:
            raise MergeError(f"{key}: got {len(value)} {what} values {value} for {n_models} models; "
                             f"give one value or exactly one per model")
        return list(value)
    return [value] * n_models
