"""BiPFT's binary transformer (Xing et al., AAAI 2024, "BiPFT: Binary Pre-trained Foundation
Transformer with Low-rank Estimation of Binarization Residual Polynomials", arXiv 2312.08937) on
the Llama models here.

From the reference code (Xingrun-Xing/BiPFT ``binary_pretraining/bipft.py``, ``utils_quant.py``
and the student config of ``run_pretrain_binary.py``) [read]:
- every block projection computes with binary weights, ``sign(W - mean W) * mean|W|`` per tensor
  (BWN; straight-through gradient), on binary inputs: the input plus a learned bias, then
  ``sign(x) * alpha`` with a learned ``alpha`` per tensor (the "elastic" binarizer: LSQ's step
  gradient scaled by ``1/sqrt(numel)``, the input's gradient passed where ``|x| <= alpha``),
  ``alpha`` set from the first batch to ``2 mean|x|``;
- attention binarizes its queries, keys and values the same way, and its probabilities with the
  unsigned form ``alpha * clamp(round(p / alpha), 0, 1)`` (``alpha`` first ``4 mean p``);
- the estimators of the binarization residual: five rank-1 full-precision maps of the
  attention's input ``h``, ``q_p, k_p, q_m, k_m, v_p = Linear(d, 1)``, shared by every head:
  ``scores = Q_b K_b^T + q_m k_p^T + q_p k_m^T + q_p k_p^T`` before the ``1/sqrt(d_head)`` scale,
  and ``context = P_b V_b + P_b v_p`` (one value added to every channel).

Ours, for a decoder [ours]: queries and keys are binarized after RoPE, under the causal mask;
grouped key/value heads are repeated first; the five maps are one ``Linear(d, 5)`` (the same
init distribution as five ``Linear(d, 1)``). Embeddings, norms and the LM head stay full
precision, as in TriLM [guess: the reference defines a quantized embedding but we did not trace
whether its pretraining binarizes it].

``install_binary_network`` swaps the block Linears for ``BinaryLinear``, attaches the attention's
binarizers and estimators (``self_attn.binary``), and registers the attention with transformers'
attention interface, so ``forward``, ``generate`` and every evaluator run the binary model. Under
a KV cache, the key-side maps of the cached tokens are kept on the cache object (their inputs are
gone), and they follow the cache when beam search reorders it or assisted decoding crops it
(``maps_on``); a cache whose maps do not cover its keys is refused.
``remove_binary_network`` folds each projection back into a plain Linear holding its binary
weight (BWN of a BWN weight is itself, so a re-install computes the same function) and returns
the side tensors, which the artifact keeps in ``auxiliary.safetensors``; ``tasks.model_io``
installs them again on load.
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv

from components.model.linear_attention import attention_modules
from components.model.side_tensors import load_side_tensors
from components.train.method import block_linears
from components.train.replacement import FoldableLinear

BINARY_ATTENTION = "paperdag_binary"  # the name registered with transformers' attention interface
SIDE_ATTR = "binary"
ALPHA_FLOOR = 1e-5  # the reference's eps under a learned alpha
ESTIMATORS = ("q_p", "k_p", "q_m", "k_m", "v_p")


class _ElasticBinarize(torch.autograd.Function):
    """``sign(x) * alpha`` (signed) or ``alpha * clamp(round(x / alpha), 0, 1)`` (unsigned)."""

    @staticmethod
    def forward(ctx, x, alpha, signed: bool):
        alpha = alpha.clamp_min(ALPHA_FLOOR)
        q = x.float() / alpha
        codes = q.sign() if signed else q.round().clamp(0, 1)
        ctx.save_for_backward(q)
        ctx.signed = signed
        return (codes * alpha).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        g = grad.float()
        inside = (q >= (-1.0 if ctx.signed else 0.0)) & (q <= 1.0)
        if ctx.signed:  # d(sign(q) alpha)/d alpha
            step = q.sign()
        else:  # LSQ: the clipped top code, or round(q) - q inside
            step = torch.where(q > 1.0, torch.ones_like(q), torch.where(inside, q.round() - q, torch.zeros_like(q)))
        grad_alpha = ((step * g).sum() / math.sqrt(q.numel())).reshape(1)
        return (g * inside).to(grad.dtype), grad_alpha, None


class ElasticBinarizer(nn.Module):
    """A learned-scale binarizer of one tensor; ``alpha`` is set from the first input it sees."""

    def __init__(self, signed: bool):
        super().__init__()
        self.signed = signed
        self.alpha = nn.Parameter(torch.ones(1))  # not 0-d: DeepSpeed broadcasts parameters as bytes
        self.register_buffer("initialized", torch.zeros(1))  # in the state: a resumed run keeps its alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            with torch.no_grad():
                first = (2.0 if self.signed else 4.0) * x.detach().float().abs().mean()
                if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                    torch.distributed.all_reduce(first)  # every rank starts from the same alpha
                    first /= torch.distributed.get_world_size()
                self.alpha.copy_(first)
                self.initialized.fill_(1.0)
        return _ElasticBinarize.apply(x, self.alpha, self.signed)


class _BinaryWeight(torch.autograd.Function):
    """Exactly ``sign(W - mean W) * mean|W|`` forward (``W + (b - W).detach()`` would round off the
    binary values), the identity backward (straight through). The means are taken in float64,
    where the mean of a weight that is already binary is its magnitude exactly: a saved binary
    model computes bit for bit what it trained as (a binary network turns ulps into sign flips)."""

    @staticmethod
    def forward(ctx, weight):
        w = weight.double()
        return ((w - w.mean()).sign() * w.abs().mean()).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def bwn(weight: torch.Tensor) -> torch.Tensor:
    return _BinaryWeight.apply(weight)


class _ExactBinaryProduct(torch.autograd.Function):
    """``a @ b`` for tensors whose entries are a code in {-1, 0, 1} times one scale each: the codes'
    integer product, then the scales. Exact, so a sum of codes that cancels is 0 however the GEMM
    is blocked; a float GEMM leaves ulps there, which the next binarizer turns into signs, and a
    cached decode step would not compute what the full forward does. The backward is the plain
    product's."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        af, bf = a.detach().float(), b.detach().float()  # fp32 reductions (a bf16 amax broke inductor's C++)
        codes = af.sign() @ bf.sign()  # integers: exact below 2**24
        return (codes * (af.abs().amax() * bf.abs().amax())).to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = grad.to(a.dtype)
        return g @ b.transpose(-1, -2), a.transpose(-1, -2) @ g


def binary_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _ExactBinaryProduct.apply(a, b)


class BinaryLinear(FoldableLinear):
    """A block projection on binary weights and binary (shifted) inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.weight = linear.weight
        self.move = nn.Parameter(torch.zeros(linear.in_features, device=linear.weight.device))
        self.binarize_input = ElasticBinarizer(signed=True)

    def effective_weight(self) -> torch.Tensor:
        return bwn(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        binary = self.binarize_input(x + self.move.to(x.dtype))
        y = binary_product(binary.reshape(-1, self.in_features), self.effective_weight().T.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class BinaryAttention(nn.Module):
    """One attention layer's binarizers and, with ``estimators``, its five rank-1 maps."""

    def __init__(self, hidden_size: int, estimators: bool, device=None):
        super().__init__()
        self.query, self.key, self.value = (ElasticBinarizer(signed=True) for _ in range(3))
        self.probs = ElasticBinarizer(signed=False)
        self.estimate = nn.Linear(hidden_size, len(ESTIMATORS), device=device) if estimators else None
        self.hidden: torch.Tensor | None = None  # the attention's input, left by a pre-hook for the maps
        self.cache = None  # and its KV cache, if any

    def residual_maps(self, layer: int, keys: int) -> tuple[torch.Tensor, ...] | None:
        """``(q_p, q_m)`` of the new tokens and ``(k_p, k_m, v_p)`` of all ``keys``, each
        ``[batch, 1, length, 1]``, from the input the hook left. Under a KV cache the key-side maps of
        earlier tokens are kept on the cache object beside its keys, and grow with it."""
        hidden, cache, self.hidden, self.cache = self.hidden, self.cache, None, None
        if self.estimate is None:
            return None
        if hidden is None:
            raise RuntimeError("binary attention: no input recorded for the estimators (the pre-hook is missing)")
        new = self.estimate(hidden).float()  # [batch, new tokens, 5]; fp32 (bf16 here broke inductor's C++)
        maps = new
        if cache is not None:
            kept = maps_on(cache)
            if hidden.shape[1] != keys and layer in kept:
                maps = torch.cat([kept[layer], new], dim=1)
            kept[layer] = maps.detach()
        if maps.shape[1] != keys:
            raise RuntimeError(f"binary attention: the estimators hold inputs of {maps.shape[1]} tokens for "
                               f"{keys} keys (a KV cache that was filled without them, or cropped or reordered)")
        q_p, _, q_m, _, _ = (m[:, None, :, None] for m in new.unbind(-1))
        _, k_p, _, k_m, v_p = (m[:, None, :, None] for m in maps.unbind(-1))
        return q_p, q_m, k_p, k_m, v_p


def maps_on(cache) -> dict[int, torch.Tensor]:
    """The key-side estimator maps kept on a KV cache, per layer ``[batch, tokens, 5]``. The first
    call also wraps the cache's ``reorder_cache`` (beam search picks the surviving beams) and
    ``crop`` (assisted decoding drops rejected tokens) so that the maps follow its keys. The
    wrappers are bound methods of the cache, so ``copy.deepcopy`` (reusing a prompt's cache) binds
    them to the copy."""
    if not hasattr(cache, "binary_maps"):
        cache.binary_maps = {}
        cache.reorder_cache = types.MethodType(_reorder_with_maps, cache)
        cache.crop = types.MethodType(_crop_with_maps, cache)
    return cache.binary_maps


def _reorder_with_maps(cache, beam_idx: torch.Tensor) -> None:
    type(cache).reorder_cache(cache, beam_idx)
    for layer, maps in cache.binary_maps.items():
        cache.binary_maps[layer] = maps.index_select(0, beam_idx.to(maps.device))


def _crop_with_maps(cache, tokens: int) -> None:
    type(cache).crop(cache, tokens)
    for layer, maps in cache.binary_maps.items():
        cache.binary_maps[layer] = maps[:, :cache.get_seq_length(layer)]


def binary_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **_):
    """transformers' attention-interface signature: ``(output [b, l, h, d], probabilities)``."""
    side: BinaryAttention = getattr(module, SIDE_ATTR)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = side.query(query), side.key(key), side.value(value)
    scores = binary_product(q, k.transpose(-1, -2))
    maps = side.residual_maps(module.layer_idx, key.shape[-2])
    if maps is not None:
        q_p, q_m, k_p, k_m, v_p = maps
        scores = scores + (q_m @ k_p.transpose(-1, -2) + q_p @ k_m.transpose(-1, -2) + q_p @ k_p.transpose(-1, -2))
    scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[-2]]
    probs = side.probs(torch.softmax(scores.float(), dim=-1).to(v.dtype))
    out = binary_product(probs, v)
    if maps is not None:
        out = out + (probs.float() @ v_p).to(out.dtype)
    return out.transpose(1, 2).contiguous(), probs


ALL_ATTENTION_FUNCTIONS.register(BINARY_ATTENTION, binary_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(BINARY_ATTENTION, eager_mask)  # an additive float mask, always


def _record_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    side = getattr(module, SIDE_ATTR)
    side.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    side.cache = kwargs.get("cache", kwargs.get("past_key_values"))


def has_binary_network(model: nn.Module) -> bool:
    return any(hasattr(m, SIDE_ATTR) for m in attention_modules(model))


def install_binary_network(model: nn.Module, estimators: bool, state: dict[str, torch.Tensor] | None = None) -> int:
    """Binarize every block projection and attention of ``model`` (loading ``state``, the tensors of
    ``binary_network_state``, when given); returns the number of binary projections."""
    if has_binary_network(model):
        raise ValueError("the model already has a binary network installed")
    linears = block_linears(model)
    for name, linear in sorted(linears.items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BinaryLinear(linear))
    hidden = model.config.hidden_size
    for module in attention_modules(model):
        setattr(module, SIDE_ATTR, BinaryAttention(hidden, estimators, device=module.q_proj.weight.device))
        module._binary_hook = module.register_forward_pre_hook(_record_input, with_kwargs=True)
    if state is not None:
        load_side_tensors(model, state, binary_network_state(model),
                          f"binary network (estimators={estimators}): the saved tensors")
    model.set_attn_implementation(BINARY_ATTENTION)
    return len(linears)


def _is_side(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return f".{SIDE_ATTR}." in name or ".binarize_input." in name or leaf == "move"


def binary_network_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a binary network adds to the plain model, by name: input shifts, scales, estimators."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t.detach().clone() for name, t in named if _is_side(name)}


def remove_binary_network(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold the projections back into plain Linears holding their binary weights, take the
    attention's side modules off and switch back to SDPA; returns the side tensors."""
    state = binary_network_state(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, BinaryLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.folded())
    for module in attention_modules(model):
        if hasattr(module, SIDE_ATTR):
            module._binary_hook.remove()
            del module._binary_hook
            delattr(module, SIDE_ATTR)
    model.set_attn_implementation("sdpa")
    return state
