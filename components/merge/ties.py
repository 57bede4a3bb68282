"""TIES-Merging: trim, elect sign, disjoint merge."""
from __future__ import annotations

from pydantic import Field

from components.merge.generalized_task_arithmetic import GeneralizedTaskArithmetic, GeneralizedTaskArithmeticParams
from components.registry import Paper


class Ties(GeneralizedTaskArithmetic):
    """(1) trim each tau_i to its top-``density`` entries by magnitude (per tensor, as mergekit);
    (2) elect each entry's sign as sign(sum_i w_i tau_i); (3) average the entries that agree with it,
    dividing by the agreeing models' summed weights (``normalize``, default true as in mergekit);
    then theta = theta_0 + lambda * that. The paper's reference code trims over the whole flattened
    task vector instead of per tensor.
    """

    key = "ties"
    paper = Paper(
        title="TIES-Merging: Resolving Interference When Merging Models",
        url="https://arxiv.org/abs/2306.01708",
        arxiv="2306.01708",
    )
    sparsification = "magnitude"
    sign_consensus = True

    class Params(GeneralizedTaskArithmeticParams):
        normalize: bool = Field(True, description="divide by the summed weights of the models agreeing with "
                                                  "the elected sign (disjoint mean)")
        density: float | list[float] = Field(
            0.2, description="fraction of each task vector's entries kept (top by magnitude), in (0, 1]; "
                             "one value or one per model (the paper's default k = 20%)")
