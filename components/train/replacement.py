"""Module replacement folded back on save: the shared base of methods that train block Linears
through a stand-in module (SLTrain's sparse + low-rank factors, QAT's fake-quantized weights).

``prepare`` swaps each targeted Linear of the decoder blocks for the method's stand-in before the
optimizer and DeepSpeed engine exist, so the stand-in's parameters are what trains; ``finalize``
swaps every stand-in back for the plain ``nn.Linear`` it computes, so the artifact is an ordinary
``LlamaForCausalLM`` that flows into PTQ, merge and evaluate.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from components.train.lora import ALL_PROJECTIONS, check_unique_names
from components.train.method import TrainingMethod, block_linears, forward_flops_per_token, unwrap


class FoldableLinear(nn.Module):
    """A stand-in for a Linear (``in_features`` x ``out_features``, optional ``bias``) computing
    ``x @ effective_weight().T + bias``, that can become that plain Linear again."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype), self.bias)

    def folded(self) -> nn.Linear:
        weight = self.effective_weight().detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class LinearReplacement(TrainingMethod):
    """Base of methods that train the block Linears through ``FoldableLinear`` stand-ins."""

    class Params(TrainingMethod.Params):
        target_modules: tuple[str, ...] = Field(ALL_PROJECTIONS, min_length=1, description="Names of the "
                                                "Linears (inside the decoder blocks) that are replaced while training.")

        _unique = field_validator("target_modules")(check_unique_names)

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The block Linears named by ``target_modules`` (refused when there are none)."""
        names = self.params.target_modules
        targets = {n: m for n, m in block_linears(model).items() if n.rsplit(".", 1)[-1] in names}
        if not targets:
            raise ValueError(f"params.target_modules {list(names)} names no Linear in the decoder blocks")
        return targets

    @staticmethod
    def check_groups_divide(targets: dict[str, nn.Linear], size: int, key: str = "group_size",
                            sides: Iterable[tuple[str, str]] = (("in", ""),)) -> None:
        """Refuse ``params.<key>=size`` where it does not divide a width of a target (first by name).

        ``sides`` lists ``("in" | "out", what)`` pairs: which width is split, and what the message adds
        about it (a low-precision GEMM names the operand whose last dimension that width is).
        """
        for name, linear in sorted(targets.items()):
            for side, what in sides:
                width = linear.in_features if side == "in" else linear.out_features
                if width % size:
                    raise ValueError(f"params.{key}={size} does not divide the {side}put width of {name} "
                                     f"({width}){what}")

    def replace(self, model: nn.Module, targets: dict[str, nn.Linear],
                stand_in: Callable[[nn.Linear], FoldableLinear]) -> None:
        for name, linear in sorted(targets.items()):  # sorted: random inits do not depend on dict order
            parent, _, child = name.rpartition(".")
            setattr(unwrap(model).get_submodule(parent), child, stand_in(linear))

    def replaced(self, model: nn.Module) -> dict[str, FoldableLinear]:
        return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, FoldableLinear)}

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """3x the forward, each stand-in counted as the dense matmul it runs here."""
        dense_equivalent = sum(m.in_features * m.out_features for m in self.replaced(model).values())
        return 3.0 * (forward_flops_per_token(model, seq_len) + 2.0 * dense_equivalent)

    def fold_back(self, model: nn.Module) -> dict[str, FoldableLinear]:
        """Put a plain Linear in every stand-in's place; returns the stand-ins that were there."""
        replaced = self.replaced(model)
        for name, module in replaced.items():
            parent, _, child = name.rpartition(".")
            setattr(unwrap(model).get_submodule(parent), child, module.folded())
        unwrap(model).requires_grad_(True)  # the saved model is an ordinary one
        return replaced
