"""Hidden-state feature distillation, optionally from a partial teacher (first k layers only).

MAE distillers (Bai et al. 2023) align the student's features with the teacher's
*intermediate* features, so the teacher only runs its first layers; self-distillation for
further pretraining (Lee et al. 2023) matches hidden states of same-width models. Both are
this loss with a different layer map and teacher depth.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components.distill.logit_kd import LogitKD, soft_kl
from components.registry import Paper
from components.train.method import attention_width, forward_flops_per_token, unwrap

#: name of the projection module attached to the student during training (removed by finalize)
PROJECTION_ATTR = "feature_kd_projection"


class _StopForward(Exception):
    """Raised by a hook after the last needed teacher layer: the rest of the teacher never runs."""


def llama_layers(model: nn.Module) -> nn.ModuleList:
    return unwrap(model).model.layers  # every preset is a LlamaForCausalLM


@contextmanager
def capture_hidden_states(model: nn.Module, indices: set[int], stop_after: int | None = None):
    """Collect hidden states into the yielded dict: index 0 is the embedding output, index
    ``l >= 1`` the output of decoder layer ``l`` (before the final norm). With ``stop_after``,
    the forward raises ``_StopForward`` right after that layer (catch it around the call)."""
    module = unwrap(model)
    states: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(index: int):
        def hook(_module, _inputs, output):
            if index in indices:
                states[index] = output[0] if isinstance(output, tuple) else output
            if stop_after is not None and index == stop_after:
                raise _StopForward
        return hook

    try:
        handles.append(module.model.embed_tokens.register_forward_hook(hook_for(0)))
        for i, layer in enumerate(module.model.layers):
            if i + 1 in indices or (stop_after is not None and i + 1 == stop_after):
                handles.append(layer.register_forward_hook(hook_for(i + 1)))
        yield states
    finally:
        for handle in handles:
            handle.remove()


def partial_forward_flops_per_token(model: nn.Module, seq_len: int, n_layers: int) -> float:
    """Forward FLOPs per token of the embeddings plus the first ``n_layers`` blocks, no
    ``lm_head``: ``2*N_matmul(first layers) + 2*n_layers*seq_len*d_attn`` (as in
    ``forward_flops_per_token``)."""
    layers = llama_layers(model)[:n_layers]
    n_matmul = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    _, d_attn = attention_width(model)
    return 2.0 * n_matmul + 2.0 * n_layers * seq_len * d_attn


class FeatureKD(LogitKD):
    """``loss = (1-alpha)*CE + alpha*T^2*KL(logits) + feature_weight * mean_l MSE(P_l h_s[l], h_t[m(l)])``.

    ``layer_map`` maps student hidden-state indices to teacher ones (0 = embeddings, l = output
    of block l); default: the student's last block to the teacher's last used block. ``P_l`` is
    a learned bias-free linear map where the widths differ, identity otherwise; it is attached
    to the student as ``feature_kd_projection`` before the optimizer is built (so it trains and
    is checkpointed) and removed by ``finalize``, so the saved model is a plain causal LM.
    ``teacher_layers=k`` runs only the teacher's first k blocks (MAE distillers); then the
    teacher has no logits, so ``alpha`` must be 0. With ``alpha=0`` the teacher never runs its
    final norm or ``lm_head`` either, and its FLOPs count only the blocks it ran.
    """

    key = "feature_kd"
    paper = Paper(
        title="Masked Autoencoders Enable Efficient Knowledge Distillers",
        url="https://arxiv.org/abs/2208.12256",
        arxiv="2208.12256",
    )
    needs_teacher = True

    class Params(LogitKD.Params):
        alpha: float = Field(0.0, ge=0, le=1, description="Weight of logit KD; 1 - alpha weighs hard-label CE.")
        feature_weight: float = Field(1.0, ge=0, description="Weight (beta) of the hidden-state MSE term.")
        layer_map: dict[int, int] | None = Field(
            None, description="student hidden-state index -> teacher index (0 = embeddings, l = block l output); "
                              "default: last student block -> last teacher block used.")
        teacher_layers: int | None = Field(
            None, ge=1, description="Run only the teacher's first k blocks (partial teacher); needs alpha=0.")

        @model_validator(mode="after")
        def _partial_teacher_has_no_logits(self):
            if self.teacher_layers is not None and self.alpha > 0:
                raise ValueError(f"teacher_layers={self.teacher_layers} runs a partial teacher, which has no "
                                 f"logits: alpha must be 0, got {self.alpha}")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self._layer_map: dict[int, int] = {}
        self._teacher_depth = 0

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        self._check_teacher(model, teacher)
        student, params = unwrap(model), self.params
        teacher_total = len(llama_layers(teacher))
        if params.teacher_layers is not None and params.teacher_layers > teacher_total:
            raise ValueError(f"feature_kd: teacher_layers={params.teacher_layers} but the teacher has "
                             f"{teacher_total} layers")
        depth = params.teacher_layers or teacher_total
        student_total = len(llama_layers(student))
        layer_map = dict(params.layer_map) if params.layer_map else self.default_layer_map(student_total, depth)
        for s, t in layer_map.items():
            if not 0 <= s <= student_total:
                raise ValueError(f"feature_kd: layer_map student index {s} is outside 0..{student_total}")
            if not 0 <= t <= depth:
                raise ValueError(f"feature_kd: layer_map teacher index {t} is outside 0..{depth} "
                                 f"(teacher_layers={params.teacher_layers}, teacher has {teacher_total} layers)")
        self._layer_map, self._teacher_depth = layer_map, depth
        d_student, d_teacher = student.config.hidden_size, unwrap(teacher).config.hidden_size
        if PROJECTION_ATTR in student._modules:
            raise ValueError(f"feature_kd: the student already has a {PROJECTION_ATTR!r} module")
        if d_student != d_teacher:
            device = next(student.parameters()).device
            projection = nn.ModuleDict({str(s): nn.Linear(d_student, d_teacher, bias=False) for s in sorted(layer_map)})
            student.add_module(PROJECTION_ATTR, projection.to(device))

    def default_layer_map(self, student_layers: int, teacher_layers: int) -> dict[int, int]:
        """The map when ``layer_map`` is unset: the student's last block to the teacher's last used one."""
        return {student_layers: teacher_layers}

    def _teacher_states(self, teacher: nn.Module, batch: torch.Tensor):
        """(teacher hidden states by index, teacher logits or None)."""
        wanted = set(self._layer_map.values())
        if self.params.alpha > 0:
            with capture_hidden_states(teacher, wanted) as states:
                logits = teacher(input_ids=batch).logits[:, :-1]
            return states, logits
        with capture_hidden_states(teacher, wanted, stop_after=self._teacher_depth) as states:
            try:
                unwrap(teacher).model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
        return states, None

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        self._check_teacher(model, teacher)
        if not self._layer_map:
            raise RuntimeError("feature_kd: bind() was not called before loss() (the trainer calls it)")
        params = self.params
        with torch.no_grad():
            teacher_states, teacher_logits = self._teacher_states(teacher, batch)
        with capture_hidden_states(model, set(self._layer_map)) as student_states:
            student_logits = model(input_ids=batch).logits[:, :-1]
        vocab = student_logits.shape[-1]
        student_flat = student_logits.reshape(-1, vocab).float()
        loss = student_flat.new_zeros(())
        if params.alpha < 1:
            loss = loss + (1 - params.alpha) * F.cross_entropy(student_flat, batch[:, 1:].reshape(-1))
        if teacher_logits is not None:
            loss = loss + params.alpha * soft_kl(student_flat, teacher_logits.reshape(-1, vocab),
                                                 params.temperature, params.direction)
        if params.feature_weight > 0:
            projection = getattr(unwrap(model), PROJECTION_ATTR, None)
            mse = student_flat.new_zeros(())
            for s, t in self._layer_map.items():
                hidden = student_states[s]
                if projection is not None:
                    hidden = projection[str(s)](hidden)
                mse = mse + F.mse_loss(hidden.float(), teacher_states[t].float())
            loss = loss + params.feature_weight * mse / len(self._layer_map)
        return loss

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """Student training (incl. the attached projections, which are linears) plus the teacher's
        forward: the full forward when ``alpha > 0``, else only its first ``teacher_layers``
        blocks (all blocks when unset) without ``lm_head``."""
        return 3.0 * forward_flops_per_token(model, seq_len) + self.teacher_flops_per_token(teacher, seq_len)

    def teacher_flops_per_token(self, teacher: nn.Module | None, seq_len: int) -> float:
        if teacher is None:
            return 0.0
        if self.params.alpha > 0:
            return forward_flops_per_token(teacher, seq_len)
        depth = self._teacher_depth or self.params.teacher_layers or len(llama_layers(teacher))
        return partial_forward_flops_per_token(teacher, seq_len, depth)

    def finalize(self, model: nn.Module) -> dict:
        student = unwrap(model)
        if PROJECTION_ATTR in student._modules:
            del student._modules[PROJECTION_ATTR]
        return {"feature_kd_layer_map": {str(s): t for s, t in sorted(self._layer_map.items())},
                "teacher_layers_run": self._teacher_depth}
