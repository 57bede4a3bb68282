"""bert2BERT growth of a Llama model: a wider and deeper model initialised from a smaller one.

bert2BERT (Chen et al., 2022, "bert2BERT: Towards Reusable Pretrained Language Models",
arXiv 2110.07143) grows a pretrained model instead of training the larger one from scratch.

Width, with **FPI** (function-preserving initialisation, from Net2Net): every new unit copies
an old one, and every weight that reads a copied unit is divided by the number of copies, so
the sums the next layer computes are unchanged and the grown model computes the same function.
Here the three widths of a Llama block grow this way:

- the residual stream (``hidden_size``): unit ``j`` copies ``j mod d``. Every old unit then
  has the same number of copies, which keeps RMSNorm's mean square exact, so the new width
  must be a whole multiple of the old one;
- attention heads: the old heads keep their place and each extra head copies a random old one
  (``head_dim`` is unchanged, so rotary embeddings and the softmax scale carry over);
- the MLP's intermediate units: the old ones keep their place, and each extra unit copies a
  random old one.

**AKI** (advanced knowledge initialisation) breaks the symmetry of the copies, which FPI
leaves in place and training can only slowly undo: the new units of layer ``l`` take their
incoming weights from the same module of layer ``l + 1`` (the top layer uses its own), while
their outgoing weights are split as in FPI. Which weights come from the upper layer is our
reading of the paper through the method notes; the official code was not found [guess].

Depth grows after width by copying whole layers: ``stack`` repeats the block sequence
(``0 1 0 1``), the paper's choice; ``interpolate`` repeats each layer in place (``0 0 1 1``),
reported to be more stable. Neither preserves the function: only width growth with FPI does.
"""
from __future__ import annotations

from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

GrowthInit = Literal["fpi", "aki"]
DepthGrowth = Literal["stack", "interpolate"]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_growable(small, hidden_size: int, num_attention_heads: int, intermediate_size: int,
                    num_hidden_layers: int) -> None:
    if not isinstance(small, LlamaForCausalLM):
        raise ValueError(f"bert2bert grows Llama models (LlamaForCausalLM); got {type(small).__name__}")
    config = small.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("bert2bert grows Llama models without biases; this model has attention_bias="
                         f"{getattr(config, 'attention_bias', False)}, mlp_bias={getattr(config, 'mlp_bias', False)}")
    if config.tie_word_embeddings:
        raise ValueError("bert2bert cannot grow a model whose lm_head is tied to its embedding: the grown embedding "
                         "copies columns while the grown lm_head must also divide them by the copy count")
    if (config.num_key_value_heads or config.num_attention_heads) != config.num_attention_heads:
        raise ValueError(f"bert2bert grows multi-head attention only; this model shares {config.num_key_value_heads} "
                         f"key/value heads among {config.num_attention_heads} query heads (grouped-query attention)")
    sizes = {"hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
             "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers}
    for name, new in sizes.items():
        old = getattr(config, name)
        if new < old:
            raise ValueError(f"bert2bert only grows a model: {name} would shrink from {old} to {new}")
    if hidden_size % config.hidden_size:
        raise ValueError(f"bert2bert needs the new hidden_size to be a whole multiple of the old one (so RMSNorm "
                         f"stays exact); {hidden_size} is not a multiple of {config.hidden_size}")
    new_head_dim = hidden_size // num_attention_heads
    if new_head_dim != _head_dim(config):
        raise ValueError(f"bert2bert keeps head_dim: {config.hidden_size}/{config.num_attention_heads} = "
                         f"{_head_dim(config)}, but the target {hidden_size}/{num_attention_heads} = {new_head_dim}")


def _extend(old: int, new: int, generator: torch.Generator) -> torch.Tensor:
    """Index map ``new -> old``: the old units keep their place, the extras copy random old ones."""
    extras = torch.randint(0, old, (new - old,), generator=generator)
    return torch.cat([torch.arange(old), extras])


def _head_rows(head_map: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row map of a q/k/v projection from a head map (each head is ``head_dim`` rows)."""
    return (head_map[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _counts(index_map: torch.Tensor, old: int) -> torch.Tensor:
    return torch.bincount(index_map, minlength=old).to(torch.float64)


def _grow_matrix(own: torch.Tensor, upper: torch.Tensor | None, rows: torch.Tensor | None, n_old_rows: int,
                 cols: torch.Tensor | None, col_counts: torch.Tensor | None) -> torch.Tensor:
    """``own[rows][:, cols] / col_counts[cols]``. With ``upper`` (AKI), the rows of new units
    (past ``n_old_rows``) come from the upper layer's matrix instead of ``own``."""
    dtype = own.dtype
    source = own.to(torch.float64)
    grown = source if rows is None else source[rows]
    if upper is not None and rows is not None and len(rows) > n_old_rows:
        grown = grown.clone()
        grown[n_old_rows:] = upper.to(torch.float64)[rows[n_old_rows:]]
    if cols is not None:
        grown = grown[:, cols] / col_counts[cols]
    return grown.to(dtype)


def layer_map(old_layers: int, new_layers: int, depth: DepthGrowth) -> list[int]:
    """Which old layer each new layer copies."""
    if depth == "stack":
        return [k % old_layers for k in range(new_layers)]
    return [k * old_layers // new_layers for k in range(new_layers)]


@torch.no_grad()
def grow_llama(small: LlamaForCausalLM, *, hidden_size: int, num_attention_heads: int, intermediate_size: int,
               num_hidden_layers: int, init: GrowthInit = "fpi", depth: DepthGrowth = "stack",
               generator: torch.Generator | None = None) -> LlamaForCausalLM:
    """A new ``LlamaForCausalLM`` of the given sizes initialised from ``small`` (left unchanged)."""
    _check_growable(small, hidden_size, num_attention_heads, intermediate_size, num_hidden_layers)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    old = small.config
    d, h, i, n_layers = old.hidden_size, old.num_attention_heads, old.intermediate_size, old.num_hidden_layers
    head_dim = _head_dim(old)
    hid = torch.arange(hidden_size) % d
    heads = _extend(h, num_attention_heads, generator)
    inter = _extend(i, intermediate_size, generator)
    qkv_rows = _head_rows(heads, head_dim)
    c_hid, c_head, c_int = _counts(hid, d), _counts(qkv_rows, h * head_dim), _counts(inter, i)

    state = small.state_dict()
    grown: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"][:, hid].clone(),
        "model.norm.weight": state["model.norm.weight"][hid].clone(),
        "lm_head.weight": _grow_matrix(state["lm_head.weight"], None, None, 0, hid, c_hid),
    }
    # (module, its row map and old row count, its column map and counts)
    layout = {
        "self_attn.q_proj": (qkv_rows, h * head_dim, hid, c_hid),
        "self_attn.k_proj": (qkv_rows, h * head_dim, hid, c_hid),
        "self_attn.v_proj": (qkv_rows, h * head_dim, hid, c_hid),
        "self_attn.o_proj": (hid, d, qkv_rows, c_head),
        "mlp.gate_proj": (inter, i, hid, c_hid),
        "mlp.up_proj": (inter, i, hid, c_hid),
        "mlp.down_proj": (hid, d, inter, c_int),
    }
    wide_layers = []
    for layer in range(n_layers):
        upper = min(layer + 1, n_layers - 1)
        tensors = {}
        for module, (rows, n_old_rows, cols, counts) in layout.items():
            own = state[f"model.layers.{layer}.{module}.weight"]
            above = state[f"model.layers.{upper}.{module}.weight"] if init == "aki" else None
            tensors[f"{module}.weight"] = _grow_matrix(own, above, rows, n_old_rows, cols, counts)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{norm}.weight"] = state[f"model.layers.{layer}.{norm}.weight"][hid].clone()
        wide_layers.append(tensors)
    for new, source in enumerate(layer_map(n_layers, num_hidden_layers, depth)):
        for name, tensor in wide_layers[source].items():
            grown[f"model.layers.{new}.{name}"] = tensor.clone()

    config = LlamaConfig.from_dict({
        **old.to_dict(), "hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_attention_heads, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers, "head_dim": head_dim})
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG alone
        model = LlamaForCausalLM(config).to(small.dtype)
    model.load_state_dict(grown, strict=True)
    return model.train(small.training)
