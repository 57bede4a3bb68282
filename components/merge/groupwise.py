"""Group-wise merging: group the fine-tunes by measured conflict and synergy, merge within groups,
then across groups.

Follows "Asymmetric Conflict and Synergy in Post-training for LLM-based Multilingual Machine
Translation": fine-tuning for one translation direction can help another (synergy) or hurt it
(conflict), and not symmetrically; models of directions in synergy are merged together, models in
conflict are kept in different groups. Here the corpus domains stand in for the directions. The
measurement (``transfer``): ``T[i, j]``, the share of fine-tune ``j``'s own gain on its domain that
fine-tune ``i`` achieves on that domain (1 = as good as j itself, 0 = no effect, < 0 = it hurts);
the link of a pair is ``min(T[i, j], T[j, i])``, so a conflict in either direction keeps them apart.
The paper's exact grouping rule, its measurement on BLEU/COMET, and its direction-aware training are
not reproduced (the paper text was not available to us; our reading, marked as such);
``grouping: cosine`` keeps the earlier parameter-space clustering as an alternative.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from components.merge.base import (MergeError, Merger, MergerParams, ScoreFn, StateDict, check_density,
                                   merge_task_vectors)
from components.merge.task_arithmetic import TaskArithmetic
from components.merge.ties import Ties
from components.registry import Paper


def task_vector_cosine(base: StateDict, models: list[StateDict]) -> torch.Tensor:
    """n x n cosine similarity of the flattened float task vectors (accumulated per tensor, float64)."""
    n = len(models)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key, base_tensor in base.items():
        if not base_tensor.is_floating_point():
            continue
        theta0 = base_tensor.to(torch.float64).flatten()
        taus = torch.stack([sd[key].to(torch.float64).flatten() - theta0 for sd in models])
        gram += (taus @ taus.T).cpu()
    norms = gram.diagonal().sqrt()
    return gram / torch.outer(norms, norms).clamp_min(1e-300)


def agglomerate(similarity: torch.Tensor, n_groups: int | None, threshold: float | None) -> list[list[int]]:
    """Average-linkage agglomerative clustering on a similarity matrix, deterministic.

    Repeatedly joins the two groups with the highest mean pairwise similarity (ties: the pair with the
    lowest indices), until ``n_groups`` remain, or, with ``threshold``, until no pair reaches it.
    Groups are returned sorted by their smallest member index.
    """
    groups = [[i] for i in range(similarity.shape[0])]
    while len(groups) > 1:
        if n_groups is not None and len(groups) <= n_groups:
            break
        best, pair = None, None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                link = similarity[groups[a]][:, groups[b]].mean().item()
                if best is None or link > best:
                    best, pair = link, (a, b)
        if n_groups is None and best < threshold:
            break
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda g: g[0])


def transfer_matrix(base_losses: dict[str, float], model_losses: list[dict[str, float]],
                    model_domains: list[str]) -> np.ndarray:
    """``T[i, j]``: the share of fine-tune j's own validation-loss gain on its domain that fine-tune i
    achieves there. When j itself gained nothing there is no share to take, so the change is
    measured relative to the base's loss instead: a fine-tune that hurts that domain still shows
    as a conflict."""
    n = len(model_losses)
    transfer = np.zeros((n, n))
    for j, domain in enumerate(model_domains):
        base = base_losses[domain]
        own_gain = base - model_losses[j][domain]
        scale = own_gain if own_gain > 0 else abs(base)
        for i in range(n):
            transfer[i, j] = (base - model_losses[i][domain]) / scale
    return transfer


class GroupwiseMerge(Merger):
    """Group the fine-tunes (average-linkage agglomerative, ``n_groups`` or a link ``threshold``) by
    measured transfer between their domains (``grouping: transfer``, the default; see the module
    docstring) or by task-vector cosine (``grouping: cosine``), merge each group with task arithmetic
    or TIES (``within``), then average the groups' task vectors uniformly:
    theta = theta_0 + mean_g tau_g. ``self.report["groups"]`` lists the groups by checkpoint name.
    With ``grouping: transfer`` the merge stage measures each fine-tune's validation loss on every
    fine-tune's domain first (``needs_domain_losses``) and calls :meth:`measure`.
    """

    key = "groupwise"
    paper = Paper(
        title="Asymmetric Conflict and Synergy in Post-training for LLM-based Multilingual Machine Translation "
              "(group-wise merging)",
        url="https://arxiv.org/search/?query=Asymmetric+Conflict+and+Synergy+in+Post-training&searchtype=title",
        arxiv=None,  # not found in the stores we could search; cited by title
    )
    requires_base = True

    class Params(MergerParams):
        grouping: Literal["transfer", "cosine"] = Field(
            "transfer", description="transfer: measured conflict and synergy between the fine-tunes' domains "
                                    "(needs a `tokens` input); cosine: task-vector similarity")
        n_groups: int | None = Field(None, ge=1, description="merge clusters until this many remain; "
                                                             "overrides threshold")
        threshold: float = Field(0.0, ge=-1.0, le=1.0, description="without n_groups: join clusters while their "
                                 "average link is >= this (transfer: no conflict on average; cosine: similarity)")
        within: Literal["task_arithmetic", "ties"] = Field("ties", description="merge used inside each group")
        density: float = Field(0.2, description="TIES keep fraction inside groups, in (0, 1] (ignored by "
                                                "task_arithmetic)")
        scaling: float = Field(1.0, allow_inf_nan=False, description="lambda inside each group")

        @field_validator("density")
        @classmethod
        def _density_range(cls, value):
            return check_density(value)

        @model_validator(mode="after")
        def _one_stopping_rule(self):
            if self.n_groups is not None and "threshold" in self.model_fields_set:
                raise ValueError("give either n_groups or threshold, not both")
            return self

    @property
    def needs_domain_losses(self) -> bool:
        return self.params.grouping == "transfer"

    def measure(self, base_losses: dict[str, float], model_losses: list[dict[str, float]],
                model_domains: list[str]) -> None:
        """Held-out losses per domain of the base and of each fine-tune, and each fine-tune's domain."""
        self._transfer = transfer_matrix(base_losses, model_losses, model_domains)
        self._domains = list(model_domains)

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        self.check_inputs(base, models, names)
        weights = self.resolve_weights(len(models), default=1.0, normalize=False)
        if self.params.grouping == "transfer":
            transfer = getattr(self, "_transfer", None)
            if transfer is None or transfer.shape != (len(models), len(models)):
                raise MergeError(f"{self.key}: grouping 'transfer' needs measured losses: call measure(...) first "
                                 "(the merge stage does, given a `tokens` input)")
            similarity = torch.from_numpy(np.minimum(transfer, transfer.T))
        else:
            similarity = task_vector_cosine(base, models)
        groups = agglomerate(similarity, self.params.n_groups, self.params.threshold)
        group_results = []
        for group in groups:
            group_weights = [weights[i] for i in group]
            if self.params.within == "ties":
                inner = Ties(Ties.Params(weights=group_weights, density=self.params.density,
                                         scaling=self.params.scaling))
            else:
                inner = TaskArithmetic(TaskArithmetic.Params(weights=group_weights, scaling=self.params.scaling))
            group_results.append(inner.merge(base, [models[i] for i in group], [names[i] for i in group]))

        def mean_of_groups(key: str, theta0: torch.Tensor, group_taus: list[torch.Tensor]) -> torch.Tensor:
            acc = torch.zeros_like(theta0)
            for tau in group_taus:
                acc += tau
            return acc / len(group_taus)

        merged = merge_task_vectors(base, group_results, mean_of_groups)
        self.report = {"groups": [[names[i] for i in g] for g in groups], "grouping": self.params.grouping,
                       "link": similarity.tolist()}
        if self.params.grouping == "transfer":
            self.report.update(transfer=self._transfer.tolist(), domains=self._domains)
        return merged
