"""ComPEFT: compress each task vector to a sparse ternary code times one scale, then merge."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from components.merge.base import (MergeError, Merger, MergerParams, ScoreFn, StateDict, check_density,
                                   merge_task_vectors)
from components.registry import Paper

SCALE_BYTES = 4  # the scale is stored as one float32


def _index_dtype(numel: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if numel - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class CompressedTaskVector:
    """tau~ = scale * t, t in {-1, 0, +1}^shape, stored as

    * ``support``: where t != 0, either a packed bitmask (``encoding="bitmask"``, ceil(n/8) bytes) or the
      sorted flat indices in the smallest unsigned integer type that holds n-1 (``encoding="indices"``);
    * ``signs``: one packed bit per nonzero entry in flat-index order (1 = negative), ceil(nnz/8) bytes;
    * ``scale``: alpha * std(trimmed tau) as float32.

    A plain 2-bit ternary code would take ceil(n/4) bytes, never less than bitmask + sign bits
    (n/8 + nnz/8 <= n/4), so it is not used.
    """

    shape: tuple[int, ...]
    encoding: Literal["bitmask", "indices"]
    support: np.ndarray
    signs: np.ndarray
    nnz: int
    scale: np.float32

    @property
    def nbytes(self) -> int:
        return compressed_nbytes(self)

    def decompress(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        numel = math.prod(self.shape)
        if self.encoding == "bitmask":
            flat_index = np.flatnonzero(np.unpackbits(self.support, count=numel))
        else:
            flat_index = self.support.astype(np.int64)
        negative = np.unpackbits(self.signs, count=self.nnz).astype(bool)
        values = np.where(negative, -1.0, 1.0)
        dense = np.zeros(numel, dtype=np.float64)
        dense[flat_index] = values * np.float64(self.scale)
        return torch.from_numpy(dense).reshape(self.shape).to(dtype)


def compressed_nbytes(compressed: CompressedTaskVector) -> int:
    """Bytes really needed to store it: support + sign bits + the float32 scale (the shape is known
    from the base checkpoint and not counted)."""
    return int(compressed.support.nbytes + compressed.signs.nbytes + SCALE_BYTES)


def compress_task_vector(tau: torch.Tensor, density: float, alpha: float = 1.0) -> CompressedTaskVector:
    """Keep the top ``max(1, floor(density * n))`` entries of ``tau`` by magnitude (exact zeros stay 0),
    ternarize them to their sign and use one scale ``alpha * std(trimmed tau)``: the population std
    of the tensor after the other entries are set to 0, as the reference code computes it
    (``replace_noise_and_constant`` in prateeky2806/ComPEFT takes ``tensor.std()`` after zeroing).
    Picks the smaller support encoding: bitmask or index list."""
    check_density(density)
    flat = tau.detach().flatten().to(torch.float64).cpu()
    numel = flat.numel()
    k = max(1, int(density * numel))
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    index = torch.sort(order).values
    index = index[flat[index] != 0]  # a zero entry has no sign: it is a ternary 0, not part of the support
    index_np = index.numpy()
    negative = (flat[index] < 0).numpy()
    trimmed = torch.zeros_like(flat)
    trimmed[index] = flat[index]
    std = trimmed.std(correction=0).item() if numel > 0 else 0.0
    signs = np.packbits(negative)
    bitmask_bytes = (numel + 7) // 8
    index_dtype = _index_dtype(numel)
    if index_np.size * index_dtype.itemsize < bitmask_bytes:
        encoding, support = "indices", index_np.astype(index_dtype)
    else:
        mask = np.zeros(numel, dtype=bool)
        mask[index_np] = True
        encoding, support = "bitmask", np.packbits(mask)
    return CompressedTaskVector(shape=tuple(tau.shape), encoding=encoding, support=support, signs=signs,
                                nnz=int(index_np.size), scale=np.float32(alpha * std))


class ComPEFT(Merger):
    """theta = theta_0 + lambda * sum_i w_i * decompress(compress(tau_i)), where compress keeps the top
    ``density`` entries of tau_i by magnitude, ternarizes them to their sign and multiplies by
    alpha * std(trimmed tau_i). The merge uses exactly what the compressed code stores.

    alpha is tuned on validation data, as the paper does: with a held-out score function (the
    merge stage passes one when it has a ``tokens`` input), each value of ``alpha_grid`` is scored
    and the lowest held-out loss wins; without one, ``alpha`` is used. Since the merge is linear
    in alpha, the codes are computed once and only rescaled per candidate.

    Scope: top-k and std are taken per tensor (one float32 scale per tensor); the paper describes one
    scale for the whole task vector. ``self.report["compressed_bytes"]`` is the honest stored size
    (see ``CompressedTaskVector``), next to ``dense_bytes`` of the task vectors in their own dtype.
    Weights default to 1.0 each, as in task arithmetic.
    """

    key = "compeft"
    paper = Paper(
        title="ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification "
              "and Quantization",
        url="https://arxiv.org/abs/2311.13171",
        arxiv="2311.13171",
    )
    requires_base = True

    class Params(MergerParams):
        density: float = Field(0.2, description="fraction of each task vector's entries kept (top by "
                                                "magnitude), in (0, 1]; tune on validation as the paper does")
        alpha: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                             description="the kept signs are scaled by alpha * std(trimmed tau); used when "
                                         "there is no held-out score to tune it on")
        alpha_grid: list[float] = Field(
            [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0], min_length=1,
            description="alphas tried on held-out data when the stage has a `tokens` input (a guess at the "
                        "paper's search range: it tunes alpha on validation, values 0.5-10)")
        scaling: float = Field(1.0, allow_inf_nan=False, description="lambda: multiplies the summed task vectors")
        normalize: bool = Field(False, description="rescale weights to sum 1 before use")

        @field_validator("density")
        @classmethod
        def _density_range(cls, value):
            return check_density(value)

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        weights = self.resolve_weights(len(models), default=1.0, normalize=self.params.normalize)
        per_model = {name: 0 for name in names}
        dense = 0

        def compressed_sum(key: str, theta0: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
            nonlocal dense
            task_sum = torch.zeros_like(theta0)
            for w, tau, sd, name in zip(weights, taus, models, names):
                code = compress_task_vector(tau, self.params.density, 1.0)  # alpha applied below
                per_model[name] += code.nbytes
                dense += sd[key].numel() * sd[key].element_size()  # in the checkpoint's own dtype, not float64
                task_sum += w * code.decompress().to(theta0.device)
            return self.params.scaling * task_sum

        sums: dict[str, torch.Tensor] = {}  # lambda * sum_i w_i * code_i(alpha=1), float64

        def keep_sum(key: str, theta0: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
            sums[key] = compressed_sum(key, theta0, taus)
            return sums[key]

        unit = merge_task_vectors(base, models, keep_sum)  # alpha = 1

        def with_alpha(alpha: float) -> StateDict:  # the merge is linear in alpha: scale the float64 sums
            if alpha == 1.0:
                return unit
            return {k: (base[k].to(torch.float64) + alpha * sums[k]).to(v.dtype) if k in sums else v
                    for k, v in unit.items()}

        self.report = {"compressed_bytes": sum(per_model.values()), "compressed_bytes_per_model": per_model,
                       "dense_bytes": dense}
        if score_fn is None:
            alpha = self.params.alpha
        else:
            scores = {a: float(score_fn(with_alpha(a))) for a in self.params.alpha_grid}
            finite = {a: v for a, v in scores.items() if math.isfinite(v)}
            if not finite:
                raise MergeError(f"{self.key}: every alpha in {self.params.alpha_grid} gave a non-finite held-out "
                                 "loss")
            alpha = min(finite, key=finite.get)
            self.report.update(alpha_scores=scores)
        self.report["alpha"] = alpha
        return with_alpha(alpha)
