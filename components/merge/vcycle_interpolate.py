"""The multi-level V-cycle's way up: de-coalesce the trained small model, interpolate with the large.

``theta = (1 - alpha) * theta_large + alpha * decoalesce(theta_small)``. ``theta_large`` is the
large model from before coalescing (the stage's ``base``). Interpolating breaks the symmetry
between the copies that de-coalescing makes. The official script uses alpha 0.5; its
``interpolate`` function defaults to 0.25. See ``components/train/vcycle_coalesce.py`` for the
way down, and ``components.model.growth`` for the operators.
"""
from __future__ import annotations

from pydantic import Field

from components.merge.base import Merger, MergeError, MergerParams, ScoreFn, StateDict, merge_weights
from components.model.growth import DepthMap, decoalesce_state_dict
from components.train.vcycle_coalesce import VCYCLE_PAPER


class VCycleInterpolate(Merger):
    key = "vcycle_interpolate"
    paper = VCYCLE_PAPER
    requires_base = True
    shaped_like_base = True

    class Params(MergerParams):
        alpha: float = Field(0.5, gt=0, le=1, description="Weight of the de-coalesced small model.")
        depth: DepthMap = Field("interpolate", description="The layer map the small model was coalesced with.")

    def merge(self, base: StateDict | None, models: list[StateDict], names: list[str],
              score_fn: ScoreFn | None = None) -> StateDict:
        if base is None:
            raise MergeError(f"{self.key}: needs the large model from before coalescing as `base`")
        if len(models) != 1:
            raise MergeError(f"{self.key}: interpolates one coalesced model into the base; got {len(models)}: {names}")
        if self.params.weights is not None:
            raise MergeError(f"{self.key}: takes alpha, not weights")
        try:
            grown = decoalesce_state_dict(models[0], base, self.params.depth)
        except (KeyError, ValueError) as error:
            raise MergeError(f"{self.key}: cannot de-coalesce {names[0]!r} into the base's shapes: {error}") from None
        if set(grown) != {k for k, v in base.items() if v.is_floating_point()}:
            raise MergeError(f"{self.key}: the base has weights the de-coalesced model lacks: "
                             f"{sorted(set(base) - set(grown))[:5]}")
        alpha = self.params.alpha
        merged = merge_weights(base, [grown], lambda key, large, small: (1 - alpha) * large + alpha * small[0])
        self.report = {"alpha": alpha, "decoalesced_from": names[0]}
        return merged
