"""Greedy model soup: add ingredients best-first, keeping each only if the held-out score does not get worse."""
from __future__ import annotations

import torch

from pydantic import field_validator

from components.merge.base import MergeError, Merger, MergerParams, ScoreFn, StateDict, merge_weights
from components.merge.uniform_soup import SOUP_PAPER


def uniform_average(models: list[StateDict]) -> StateDict:
    """Mean of float tensors (in float64, cast back); integer buffers from the first model."""

    def mean(key: str, first: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for theta in thetas:
            acc += theta
        return acc / len(thetas)

    return merge_weights(models[0], models, mean)


class GreedySoup(Merger):
    """Recipe 1 of the paper: sort ingredients by their own held-out score, start the soup with the best,
    then try each next one and keep it only if the uniform soup's score does not get worse.

    ``score_fn(state_dict) -> float`` is given to ``merge`` and is LOWER-is-better (e.g. held-out loss;
    pass -accuracy for accuracy). Because an ingredient is only kept when the score does not rise, the
    returned soup scores <= the best single ingredient by construction. Ties in individual scores keep
    the given order. ``self.report`` records the individual scores, the trial order, the kept names and
    the soup's score. ``base`` is only used for the compatibility check.
    """

    key = "greedy_soup"
    paper = SOUP_PAPER
    requires_base = False

    class Params(MergerParams):
        """Only where to score (``validation_domain``): the ingredients and the score decide the rest."""

        @field_validator("weights")
        @classmethod
        def _no_weights(cls, weights: list[float] | None) -> list[float] | None:
            if weights is not None:
                raise ValueError("greedy_soup averages the kept ingredients uniformly; weights do not apply")
            return weights

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        if score_fn is None:
            raise MergeError(f"{self.key}: needs a held-out score function; call merge(..., score_fn=f) with "
                             f"f(state_dict) -> float, lower is better (e.g. held-out loss)")
        self.check_inputs(base, models, names)
        individual = [self._score(score_fn, sd, name) for sd, name in zip(models, names)]
        order = sorted(range(len(models)), key=lambda i: individual[i])  # stable: ties keep the given order
        kept = [order[0]]
        soup, best = models[order[0]], individual[order[0]]
        for i in order[1:]:
            candidate = uniform_average([models[j] for j in kept + [i]])
            score = self._score(score_fn, candidate, f"soup + {names[i]}")
            if score <= best:  # the paper's 'does not drop'
                kept.append(i)
                soup, best = candidate, score
        self.report = {
            "individual_scores": {names[i]: individual[i] for i in range(len(models))},
            "tried_in_order": [names[i] for i in order],
            "kept": [names[i] for i in kept],
            "soup_score": best,
        }
        # a soup of one is that model: return a copy so the caller's checkpoint is never aliased
        return {k: v.clone() for k, v in soup.items()} if len(kept) == 1 else soup

    @staticmethod
    def _score(score_fn: ScoreFn, sd: StateDict, what: str) -> float:
        score = float(score_fn(sd))
        if score != score:  # NaN would make every comparison false and silently drop ingredients
            raise MergeError(f"greedy_soup: score_fn returned NaN for {what}")
        return score
