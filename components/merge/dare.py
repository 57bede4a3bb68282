"""DARE (Drop And REscale) in front of task arithmetic (``dare_linear``) or TIES (``dare_ties``)."""
from __future__ import annotations

from pydantic import Field

from components.merge.generalized_task_arithmetic import GeneralizedTaskArithmetic, GeneralizedTaskArithmeticParams
from components.registry import Paper

DARE_PAPER = Paper(
    title="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    url="https://arxiv.org/abs/2311.03099",
    arxiv="2311.03099",
)


class DareParams(GeneralizedTaskArithmeticParams):
    density: float | list[float] = Field(
        0.1, description="keep probability 1 - p of each task-vector entry, in (0, 1]; "
                         "one value or one per model (the paper drops p = 0.9)")
    seed: int = Field(0, description="masks are drawn per tensor from a generator seeded by "
                                     "(seed, model position, tensor name)")


class DareLinear(GeneralizedTaskArithmetic):
    """Each entry of tau_i is dropped with p = 1 - density and kept ones are divided by 1 - p
    (paper-exact, as the official ``mask_input_with_mask_rate(use_rescale=True)`` and peft's
    ``dare_linear``), then task arithmetic: theta = theta_0 + lambda * sum_i w_i tau~_i.
    mergekit's ``dare_linear`` differs: it rescales the masked delta to keep the original L1 norm.
    Deterministic for a given ``seed``; at density 1 it equals ``task_arithmetic`` bit for bit.
    """

    key = "dare_linear"
    paper = DARE_PAPER
    sparsification = "random_dare"
    sign_consensus = False
    Params = DareParams


class DareTies(GeneralizedTaskArithmetic):
    """DARE drop-and-rescale (paper-exact 1/(1-p), see ``dare_linear``) of each task vector, then TIES
    sign election and disjoint mean (``normalize``, default true) scaled by lambda."""

    key = "dare_ties"
    paper = DARE_PAPER
    sparsification = "random_dare"
    sign_consensus = True

    class Params(DareParams):
        normalize: bool = Field(True, description="divide by the summed weights of the models agreeing with "
                                                  "the elected sign (disjoint mean)")
