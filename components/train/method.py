"""Base class of every training method (pretraining, fine-tuning, distillation).

The shared trainer (``components.train.trainer.train``) owns the loop, optimizer, precision,
data order and checkpoints; a method only decides what is special about it through hooks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from components.model.side_tensors import AUXILIARY_FILE  # noqa: F401  (where callers find it)
from components.registry import Method
from components.train.trainer import TrainConfig


def step_seed(seed: int, salt: bytes, step: int) -> int:
    """A seed for one step's random draws, from the run's seed, a per-method salt (a few bytes,
    so methods draw independently) and the step, so a resumed run draws what the uninterrupted
    run drew at that step."""
    words = [seed % 2**32, int.from_bytes(salt, "big"), step]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers inside the transformer blocks (attention and MLP projections).

    Embeddings and ``lm_head`` are excluded: sparse methods keep those dense.
    """
    model = unwrap(model)
    layers = model.model.layers  # LlamaForCausalLM layout; every preset is a Llama
    return {
        f"model.layers.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


def block_weight_counts(model: nn.Module, mean_density: float | None = None) -> dict[str, int]:
    """Block-linear weights of a trained plain model (the non-embedding count of scaling laws):
    ``block_params`` (all), ``block_params_final`` (the nonzero ones, measured) and
    ``block_params_avg``, their average over training (the Journey paper's N_avg): all times the
    method's ``mean_density`` where it reports one (gradual pruning), else the final count (no
    mask, or one fixed from the first step)."""
    weights = [m.weight for m in block_linears(model).values()]
    total = sum(w.numel() for w in weights)
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    average = round(total * mean_density) if mean_density is not None else nonzero
    return {"block_params": total, "block_params_final": nonzero, "block_params_avg": average}


def attention_width(model: nn.Module) -> tuple[int, int]:
    """(n_layers, n_heads * head_dim) of a Llama-style config."""
    config = unwrap(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_attention_heads * head_dim


def check_own_attention(attention: str, method: str, kind: str) -> None:
    """A method whose attention is part of the model (Hedgehog's linear, BiPFT's binary) trains
    through it: the trainer's kernel choice must stay 'auto'."""
    if attention != "auto":
        raise ValueError(f"attention={attention!r}: {method} trains through its own {kind} attention; leave "
                         "attention at 'auto'")


def forward_flops_per_token(model: nn.Module, seq_len: int, block_density: float = 1.0) -> float:
    """Forward FLOPs per token (Kaplan et al. 2020): ``2*N_matmul + 2*n_layers*seq_len*d_attn``.

    ``N_matmul`` counts every ``nn.Linear`` weight (block projections and ``lm_head``) and no
    embedding tables or norms; block linears are scaled by ``block_density`` for sparse weights.
    The attention term covers QK^T and AV over the full context (no causal halving).
    """
    blocks = {id(m) for m in block_linears(model).values()}
    n_matmul = 0.0
    for module in unwrap(model).modules():
        if isinstance(module, nn.Linear):
            scale = block_density if id(module) in blocks else 1.0
            n_matmul += scale * module.weight.numel()
    n_layers, d_attn = attention_width(model)
    return 2.0 * n_matmul + 2.0 * n_layers * seq_len * d_attn


class TrainingMethod(Method):
    """A training recipe: hooks the shared trainer calls around its loop."""

    class Params(TrainConfig):
        """Each method's params carry the training hyperparameters (see ``TrainConfig``)."""

    #: True when ``loss`` needs a teacher model (distillation).
    needs_teacher: bool = False
    #: False when the method keeps per-block state (e.g. last epoch's predictions) that, on
    #: several data-parallel ranks, each rank would update for its own blocks only.
    shards_across_ranks: bool = True
    #: Why the method cannot train on several ranks, if it cannot (the recipe compiler refuses
    #: ``resources.ranks`` > 1 with this reason); empty: it can.
    one_process_only: str = ""
    #: True when the method trains the weights onto a low-bit grid (QAT, L4Q): its input model must
    #: not be quantized already (a second grid on top of the first is refused, not stacked).
    quantizes_weights: bool = False

    def use_tokenizer(self, tokenizer) -> None:
        """Called first, with the tokenizer of the training tokens (e.g. to find answer tokens)."""

    def use_blocks(self, blocks: np.ndarray) -> None:
        """Called before ``prepare`` with the training blocks ``(n_blocks, seq_len)`` (e.g. to index
        them for retrieval); ``on_batch``'s indices are rows of this array."""

    def prepare(self, model: nn.Module) -> None:
        """Called once on the plain model before the optimizer exists (e.g. install masks)."""

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        """Called right after ``prepare`` (still before the optimizer exists, so modules attached to
        ``model`` here are trained) with the teacher (or None) and the number of training blocks."""

    def optimizer(self, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
        """The method's own optimizer over ``model``'s trainable parameters (e.g. GaLore's projected
        Adam), built before the DeepSpeed engine; None (the default): the trainer builds
        ``config.optimizer``. Called after ``bind`` and after ``config.freeze`` is applied."""
        return None

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        """Parameter groups with settings of their own (e.g. QFX's binary points: their own learning
        rate, no decay) inside the trainer's ``config.optimizer``; the trainer takes their
        parameters out of its default groups. Default: none. Called where ``optimizer`` is."""
        return []

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        """Called before ``loss`` with the 1-based step and the block indices (rows of the
        ``blocks`` array) of the batch, in batch order."""

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        """Scalar loss of one batch of token ids ``(batch, seq)``; default: causal LM loss.

        ``model`` may be a DeepSpeed engine; HF shifts the labels internally.
        """
        return model(input_ids=batch, labels=batch).loss

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step on the plain model (e.g. re-apply masks)."""

    def flops_per_token(self, model: nn.Module, seq_len: int, teacher: nn.Module | None = None) -> float:
        """Training FLOPs per token: 3x the forward (forward + 2x backward).

        ``6*N_matmul + 6*n_layers*seq_len*d_attn`` with ``N_matmul`` = all linear weights incl.
        ``lm_head``, excl. embeddings (see ``forward_flops_per_token``).
        """
        return 3.0 * forward_flops_per_token(model, seq_len)

    def finalize(self, model: nn.Module) -> dict:
        """Facts about the trained model for the artifact metadata."""
        return {}

    def pack(self, model: nn.Module):
        """Packed low-bit weights of the trained plain ``model`` for the artifact's
        ``quantized.safetensors`` (a ``components.quant.base.QuantizedModel`` whose ``state_dict``
        holds the dequantized values of the packed weights), or None (the default): no packed file.
        Called on rank 0's saved model, after ``finalize``."""
        return None

    def auxiliary_tensors(self) -> dict[str, torch.Tensor]:
        """Trained tensors that are not part of the saved model (e.g. HLP's horizon head), written
        beside it as ``auxiliary.safetensors``; called after ``finalize``. Default: none."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that must survive a resume (e.g. masks), saved in every checkpoint."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned; called after ``prepare`` on resume."""
        if tensors:
            raise ValueError(f"{type(self).__name__} has no state tensors but the checkpoint has {sorted(tensors)}")
