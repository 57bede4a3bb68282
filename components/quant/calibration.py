"""Calibration capture: the inputs each decoder block (and each Linear in it) sees.

Every calibrated PTQ method (GPTQ, the block-reconstruction family, the Hessian
sensitivity tools) starts the same way: run calibration sequences up to decoder block 0,
keep its inputs, then walk the blocks one at a time. ``BlockInputs`` holds one block's
inputs (a list of hidden-state batches plus the keyword arguments the block needs: the
causal mask and the rotary position embeddings, shared by every block of a Llama-style
model), so methods never re-run the embeddings or earlier blocks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from components.quant.base import BLOCK_PREFIX, QuantizationError
from components.quant.gptq_solver import HessianAccumulator


class _StopForward(Exception):
    """Raised inside block 0 once its inputs are captured: nothing after it needs to run."""


@dataclass
class BlockInputs:
    """Hidden states entering one block, in calibration batches, plus the block's kwargs."""

    batches: list[torch.Tensor]
    kwargs: dict

    def run(self, block: torch.nn.Module) -> "BlockInputs":
        """This block's outputs, which are the next block's inputs."""
        with torch.no_grad():
            return BlockInputs([block(h, **self.kwargs) for h in self.batches], self.kwargs)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.batches)


def decoder_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder blocks of a HF Llama-style causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise QuantizationError(
            f"{type(model).__name__} has no decoder blocks at model.model.layers; calibrated "
            "quantizers support Llama-style causal LMs")
    return layers


def check_calibration(tokens: torch.Tensor | None, method: str, min_sequences: int = 1,
                      min_length: int = 2) -> torch.Tensor:
    """Validate calibration token ids ``[n_sequences, seq_len]`` before any work is done."""
    if tokens is None:
        raise QuantizationError(
            f"{method}: needs calibration data; give the quantize stage a `tokens` input "
            "(inputs: {model: ..., tokens: <tokenize stage>})")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise QuantizationError(
            f"{method}: calibration must be integer token ids of shape [n_sequences, seq_len], "
            f"got dtype {tokens.dtype} shape {tuple(tokens.shape)}")
    if tokens.shape[0] < min_sequences or tokens.shape[1] < min_length:
        raise QuantizationError(
            f"{method}: calibration data too small: {tokens.shape[0]} sequences x {tokens.shape[1]} "
            f"tokens; need at least {min_sequences} sequences of at least {min_length} tokens")
    return tokens.long()


def capture_block_inputs(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Run ``tokens`` through the embeddings and stop at block 0, keeping its inputs."""
    block0 = decoder_blocks(model)[0]
    batches: list[torch.Tensor] = []
    kwargs: dict = {}

    def catch(_module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        batches.append(hidden.detach())
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings",
                                                             "position_ids")})
        raise _StopForward

    handle = block0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[start:start + batch_size], use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    # One mask/rotary set serves every batch, which holds while they broadcast over the batch
    # (no padding mask); a short last batch then needs nothing of its own.
    if tokens.shape[0] % batch_size and not _batch_independent(kwargs):
        raise QuantizationError(
            f"{tokens.shape[0]} calibration sequences do not split into batches of {batch_size} and this "
            "model's block inputs are batch-specific; make `calibration_sequences` a multiple of `batch_size`")
    return BlockInputs(batches, kwargs)


def _batch_independent(kwargs: dict) -> bool:
    tensors = [t for v in kwargs.values() for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t)]
    return all(t.dim() == 0 or t.shape[0] == 1 for t in tensors)


def block_linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers of one block, by their name inside the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


@contextmanager
def linear_input_hooks(block: torch.nn.Module, names: list[str],
                       fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` with the input of each named Linear on every forward."""
    linears = block_linears(block)
    handles = [linears[n].register_forward_pre_hook(lambda _m, args, n=n: fn(n, args[0].detach()))
               for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def targeted_groups(targets: set[str]) -> Callable[[str, torch.nn.Module], list[list[str]]]:
    """``groups_of`` for ``walk_blocks_with_hessians``: each block's input-sharing groups, keeping
    the Linears whose full module name is in ``targets``."""
    return lambda prefix, block: [[n for n in g if prefix + n in targets] for g in linear_groups(block)]


EditGroup = Callable[[str, dict[str, torch.nn.Linear], list[str], "torch.Tensor | None"], None]


def walk_blocks_with_hessians(model: PreTrainedModel, inputs: BlockInputs | None,
                              groups_of: Callable[[str, torch.nn.Module], list[list[str]]], edit: EditGroup, *,
                              sequential: bool = False, dtype: torch.dtype = torch.float32,
                              desc: str | None = None) -> None:
    """GPTQ's walk over the decoder blocks, for every calibrated method that edits a block's
    Linears in place (GPTQ, GPTQ over a minifloat grid, Wanda, SparseGPT).

    Per block: one forward collects the input Hessian ``2/n XᵀX`` of each input-sharing group
    of Linears (``groups_of(prefix, block)``; a group's Linears read one input, so its first
    stands for all), then ``edit(prefix, linears, group, H)`` changes the group's weights, and
    the edited block's outputs become the next block's inputs. ``sequential``: one forward per
    group, so a later group's inputs pass through the already-edited earlier groups (GPTQ's
    ``true_sequential``); otherwise one forward of the unedited block serves all its groups.
    ``inputs=None`` (a method without calibration, e.g. magnitude pruning): no forwards, H is None.
    ``desc``: a progress bar over the blocks."""
    for index, block in enumerate(tqdm(decoder_blocks(model), desc=desc, unit="block", disable=desc is None)):
        linears, prefix = block_linears(block), f"{BLOCK_PREFIX}{index}."
        groups = [g for g in groups_of(prefix, block) if g]
        for pass_groups in [[g] for g in groups] if sequential else [groups]:
            hessians: dict[str, HessianAccumulator] = {}
            if inputs is not None:
                hessians = {g[0]: HessianAccumulator(linears[g[0]].in_features, dtype=dtype, name=prefix + g[0])
                            for g in pass_groups}
                with linear_input_hooks(block, list(hessians), lambda n, x: hessians[n].add(x)):
                    inputs.run(block)
            for group in pass_groups:
                edit(prefix, linears, group, hessians[group[0]].hessian if hessians else None)
        if inputs is not None:
            inputs = inputs.run(block)


@contextmanager
def swapped_weights(modules, replacement: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the named modules (``modules[name].weight``) these weights; restored after."""
    saved = {m: modules[m].weight.data for m in replacement}
    try:
        for m, w in replacement.items():
            modules[m].weight.data = w.to(saved[m].dtype)
        yield
    finally:
        for m, w in saved.items():
            modules[m].weight.data = w


def linear_groups(block: torch.nn.Module) -> list[list[str]]:
    """Linears of a block grouped by the input they share, in forward order.

    GPTQ-style sequential quantization quantizes a group, then recomputes the inputs of the
    next group through the already-quantized layers (q/k/v share one input, then o_proj,
    then gate/up, then down_proj)."""
    names = list(block_linears(block))
    order = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    if sorted(sum(order, [])) == sorted(names):
        return order
    return [[n] for n in names]  # unknown block layout: one Linear at a time, in module order


def calibration_sample(blocks, n_sequences: int, seed: int) -> torch.Tensor:
    """``n_sequences`` rows drawn without replacement (fixed seed) from packed token blocks."""
    blocks = torch.as_tensor(blocks)
    if blocks.shape[0] == 0:
        raise QuantizationError("calibration data is empty (0 token blocks in the training split)")
    if n_sequences > blocks.shape[0]:
        raise QuantizationError(
            f"calibration asks for {n_sequences} sequences but the training split has only "
            f"{blocks.shape[0]} blocks; lower `calibration_sequences`")
    g = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(blocks.shape[0], generator=g)[:n_sequences]].long()
