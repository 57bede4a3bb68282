"""Shared machinery for training under a fixed sparsity mask on the block linear layers.

Masked gradients are zeroed by a tensor hook before they reach ``.grad``, so gradient
clipping and AdamW moments only see the live weights; masked weights then stay exactly zero
(AdamW's update and decoupled decay of a zero weight with zero moments are zero), and
``after_step`` re-applies the masks anyway as a cheap guarantee.
"""
from __future__ import annotations

import torch
from torch import nn

from components.train.method import TrainingMethod, block_linears, forward_flops_per_token

MASK_PREFIX = "mask."


class MaskedTraining(TrainingMethod):
    """Base of methods that train block linears under a static mask (not registered itself)."""

    def __init__(self, params=None):
        super().__init__(params)
        self.masks: dict[str, torch.Tensor] = {}  # block linear name -> bool mask (True = live)
        self._weights: list[torch.Tensor] = []
        self._float_masks: list[torch.Tensor] = []
        self._hooks: list = []
        self._model: nn.Module | None = None

    def build_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        self._model = model
        self.masks = self.build_masks(model)
        self._install(model)

    def _install(self, model: nn.Module) -> None:
        self._remove_hooks()
        linears = block_linears(model)
        unknown = sorted(set(self.masks) - set(linears))
        if unknown:
            raise ValueError(f"{type(self).__name__}: masks for unknown layers {unknown}")
        self._weights, self._float_masks = [], []
        for name, mask in self.masks.items():
            weight = linears[name].weight
            if mask.shape != weight.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
            live = mask.to(device=weight.device, dtype=weight.dtype)  # float: one multiply, no casts per step
            self._weights.append(weight)
            self._float_masks.append(live)
            self._hooks.append(weight.register_hook(lambda grad, live=live: grad * live))
        self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        if self._weights:
            torch._foreach_mul_(self._weights, self._float_masks)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def after_step(self, model: nn.Module) -> None:
        self._apply()

    def density(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return float(sum(int(m.sum()) for m in self.masks.values()) / total) if total else 1.0

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """``6*(density*N_block_linear + N_lm_head) + 6*n_layers*seq_len*d_attn``: masked block
        linears cost in proportion to their live weights (what sparse kernels would do)."""
        return 3.0 * forward_flops_per_token(model, seq_len, block_density=self.density())

    def finalize(self, model: nn.Module) -> dict:
        """Measured on the weights: zeros among the masked layers. Also removes the grad hooks."""
        self._remove_hooks()
        linears = block_linears(model)
        total = sum(linears[name].weight.numel() for name in self.masks)
        zeros = sum(int((linears[name].weight == 0).sum()) for name in self.masks)
        sparsity = zeros / total if total else 0.0
        return {"sparsity": sparsity, "density": 1.0 - sparsity, "masked_layers": len(self.masks)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {MASK_PREFIX + name: mask for name, mask in self.masks.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        masks = {k[len(MASK_PREFIX):]: v.bool() for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
        if set(masks) != set(self.masks):
            raise ValueError(f"checkpoint masks {sorted(masks)} do not match this model's {sorted(self.masks)}")
        self.masks = masks
        self._install(self._model)
