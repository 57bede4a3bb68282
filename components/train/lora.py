"""LoRA fine-tuning through the ``peft`` library, merged into the base weights when training ends.

LoRA (Hu et al., 2021) freezes the pretrained weights and trains, beside each targeted Linear
``W`` (out x in), a low-rank update ``(alpha / rank) * B @ A`` with ``A`` (rank x in, Kaiming
init) and ``B`` (out x rank, zeros), so training starts from the pretrained function. peft's
``inject_adapter_in_model`` installs its own ``LoraLayer`` modules into the model in place;
every other parameter is frozen, so the optimizer holds state for the adapters only. When
training ends, ``finalize`` merges each adapter into its base weight and puts the plain
``nn.Linear`` back: the artifact is a plain ``LlamaForCausalLM`` that ``from_pretrained``
loads and that flows into PTQ, merge and evaluate like any fine-tune.

A resumed run injects the adapters again before the checkpoint loads (same seed, same
initialisation), so its state-dict keys match. Training FLOPs are counted as for any model
(3x the forward, adapters included): the frozen base weights need no weight gradients, so
this overstates LoRA's backward by up to a third.
"""
from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator
from torch import nn

from components.registry import Paper
from components.train.method import TrainingMethod, unwrap
from components.train.trainer import check_patterns_compile

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_unique_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
    """Validator of a ``target_modules`` field: no name twice."""
    if len(set(names)) != len(names):
        raise ValueError(f"target_modules lists a module twice: {list(names)}")
    return names


class LoraError(ValueError):
    """LoRA params that cannot apply to the model (a rank above a layer's width, no target)."""


class LoraFinetune(TrainingMethod):
    key = "lora"
    paper = Paper(title="LoRA: Low-Rank Adaptation of Large Language Models",
                  url="https://arxiv.org/abs/2106.09685", arxiv="2106.09685")

    class Params(TrainingMethod.Params):
        rank: int = Field(8, ge=1, description="Rank r of each adapter's update B @ A.")
        alpha: float = Field(16.0, gt=0, description="The update is scaled by alpha / rank.")
        dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
        target_modules: tuple[str, ...] = Field(
            ALL_PROJECTIONS, min_length=1, description="Names of the Linears (inside the decoder blocks) that "
            "get an adapter; the QLoRA-style default targets every projection.")

        also_train: tuple[str, ...] = Field(
            (), description="Regular expressions (re.search) over parameter names that train beside the adapters, "
            "e.g. embeddings, norms and lm_head when LoRA pretrains from scratch (the GaLore paper's LoRA "
            "baseline); default: the adapters alone, as in the LoRA paper.")

        _unique = field_validator("target_modules")(check_unique_names)

        _also_train_compiles = field_validator("also_train")(check_patterns_compile)

    def prepare(self, model: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        p = self.params
        model = unwrap(model)
        targets = {name: m for name, m in model.model.layers.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in p.target_modules}
        missing = set(p.target_modules) - {name.rsplit(".", 1)[-1] for name in targets}
        if missing:
            known = sorted({n.rsplit(".", 1)[-1] for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)})
            raise LoraError(f"params.target_modules: {sorted(missing)} name no Linear in the decoder blocks; "
                            f"the blocks have {known}")
        narrow = {name: min(m.in_features, m.out_features) for name, m in targets.items()
                  if p.rank > min(m.in_features, m.out_features)}
        if narrow:
            name, width = next(iter(sorted(narrow.items())))
            raise LoraError(f"params.rank={p.rank} is larger than layer {name} allows (min(in, out) = {width}); "
                            "a rank above a layer's width adds parameters without adding rank")
        config = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout,
                            target_modules=list(p.target_modules), bias="none")
        inject_adapter_in_model(config, model)
        also = [re.compile(pattern) for pattern in p.also_train]
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or any(c.search(name) for c in also))

    def finalize(self, model: nn.Module) -> dict:
        from peft.tuners.lora import LoraLayer

        model = unwrap(model)
        adapters = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
        adapter_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        with torch.no_grad():
            for name, module in adapters:
                module.merge()  # W += (alpha / rank) * B @ A
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        model.requires_grad_(True)  # the saved model is an ordinary one
        return {"lora_rank": self.params.rank, "lora_alpha": self.params.alpha, "lora_adapters": len(adapters),
                "lora_params": adapter_params}
