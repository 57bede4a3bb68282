"""Width and depth maps between a narrow and a wide Llama, and the two operators over them.

**Growing** (narrow to wide) copies units, and **coalescing** (wide to narrow) merges them. Two
papers use these operators:

- bert2BERT (Chen et al., 2022, arXiv 2110.07143) grows a pretrained model;
- the multi-level V-cycle (Zou et al., ICLR 2024, arXiv 2404.07999) coalesces a model, trains
  the small one, grows it back ("de-coalescing") and interpolates.

## The maps

Every unit of the wide model maps to one unit of the narrow model:

- **The residual stream** (``hidden_size``) always maps cyclically: unit ``j`` maps to
  ``j mod d``. Every narrow unit then has the same number of copies, so RMSNorm's mean square is
  exact, and the wide width must be a whole multiple of the narrow one.
- **Attention heads** map whole (``head_dim`` is the same in both), as do **MLP units**. With
  ``extras="random"`` (bert2BERT), the narrow units keep their place and each extra unit copies
  a random one. With ``extras="cyclic"`` (V-cycle), unit ``j`` maps to ``j mod n``: the official
  code's default pairing of unit ``j`` with ``j + n``.
- **Layers** map by ``stack`` (``0 1 0 1``, bert2BERT's choice) or by ``interpolate``
  (``0 0 1 1``: adjacent layers, the V-cycle code's default).

## The operators

**Growing with FPI** (function-preserving initialisation, from Net2Net) copies rows through the
map, and divides every column that reads a copied unit by the unit's number of copies. The sums
the next layer computes are then unchanged, so width growth keeps the logits exactly (tested).

**Growing with AKI** (bert2BERT's advanced knowledge initialisation) breaks the symmetry
between copies: the new units of layer ``l`` take their incoming rows from the same module of
layer ``l + 1``, and the top layer uses its own. Which weights come from the upper layer is our
reading of the paper through the method notes; we did not find the official code. **[guess]**

**Coalescing** is the transpose. A narrow row is the mean of the rows mapped to it, a narrow
column is the sum of the columns mapped to it, and a narrow layer is the mean of its wide
layers, as the V-cycle code's normalised coalescing matrices do. Coalescing a grown model gives
back the narrow model exactly (tested). The official GPT-2 code also doubles the coalesced
embeddings (and halves them when de-coalescing), which serves LayerNorm models. Here embeddings
are averaged like every other row, so the narrow residual stream is the mean of the wide one's
copies.

Depth growth does not preserve the function, here or in the papers. Only width growth with FPI
does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

GrowthInit = Literal["fpi", "aki"]
DepthMap = Literal["stack", "interpolate"]
Extras = Literal["random", "cyclic"]
StateDict = dict[str, torch.Tensor]

# the sizes growth and coalescing change (head_dim stays)
SIZE_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
# module -> (its row map, its column map): "hidden" is the residual stream, "attention" the rows of
# q/k/v (heads x head_dim), "mlp" the intermediate units
_LAYOUT = {
    "self_attn.q_proj": ("attention", "hidden"),
    "self_attn.k_proj": ("attention", "hidden"),
    "self_attn.v_proj": ("attention", "hidden"),
    "self_attn.o_proj": ("hidden", "attention"),
    "mlp.gate_proj": ("mlp", "hidden"),
    "mlp.up_proj": ("mlp", "hidden"),
    "mlp.down_proj": ("hidden", "mlp"),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class LlamaSizes:
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "LlamaSizes":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(*(getattr(config, key) for key in SIZE_KEYS), head_dim=head_dim)

    @property
    def widths(self) -> dict[str, int]:
        return {"hidden": self.hidden_size, "attention": self.num_attention_heads * self.head_dim,
                "mlp": self.intermediate_size}

    def as_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in SIZE_KEYS}


@dataclass(frozen=True)
class WidthMaps:
    """For each width ("hidden", "attention", "mlp"): the narrow unit each wide unit maps to."""

    maps: dict[str, torch.Tensor]
    narrow: dict[str, int]  # the narrow widths

    def counts(self, width: str) -> torch.Tensor:
        """How many wide units map to each narrow unit (float64)."""
        return torch.bincount(self.maps[width], minlength=self.narrow[width]).to(torch.float64)


def check_llama(model, operation: str) -> None:
    """The model shapes these operators handle: a bias-free, untied, multi-head Llama."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"{operation} works on Llama models (LlamaForCausalLM); got {type(model).__name__}")
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(f"{operation} works on Llama models without biases; this model has attention_bias="
                         f"{getattr(config, 'attention_bias', False)}, mlp_bias={getattr(config, 'mlp_bias', False)}")
    if config.tie_word_embeddings:
        raise ValueError(f"{operation} cannot resize a model whose lm_head is tied to its embedding: the embedding's "
                         "hidden units are rows to copy, while the lm_head's are columns to split")
    if (config.num_key_value_heads or config.num_attention_heads) != config.num_attention_heads:
        raise ValueError(f"{operation} works on multi-head attention only; this model shares "
                         f"{config.num_key_value_heads} key/value heads among {config.num_attention_heads} query heads "
                         "(grouped-query attention)")


def check_sizes(narrow: LlamaSizes, wide: LlamaSizes, extras: Extras, operation: str) -> None:
    """The input ``narrow`` can grow into the target ``wide``: no size shrinks, the residual stream
    (and every width, for cyclic maps) is a whole multiple, and heads keep their size."""
    for key in SIZE_KEYS:
        if getattr(wide, key) < getattr(narrow, key):
            raise ValueError(f"{operation}: the target's {key} ({getattr(wide, key)}) is below the input's "
                             f"({getattr(narrow, key)})")
    if wide.head_dim != narrow.head_dim:
        raise ValueError(f"{operation} keeps head_dim: the input's {narrow.hidden_size}/{narrow.num_attention_heads} "
                         f"= {narrow.head_dim}, the target's {wide.hidden_size}/{wide.num_attention_heads} = "
                         f"{wide.head_dim}")
    multiples = SIZE_KEYS[:3] if extras == "cyclic" else ("hidden_size",)
    for key in multiples:
        if getattr(wide, key) % getattr(narrow, key):
            raise ValueError(f"{operation} needs the target's {key} to be a whole multiple of the input's; "
                             f"{getattr(wide, key)} is not a multiple of {getattr(narrow, key)}")


def width_maps(narrow: LlamaSizes, wide: LlamaSizes, extras: Extras,
               generator: torch.Generator | None = None) -> WidthMaps:
    """The wide-to-narrow maps (see the module docstring); ``generator`` draws random extras."""
    if extras == "cyclic":
        return cyclic_maps(narrow.widths, wide.widths)

    def keep_and_draw(old: int, new: int) -> torch.Tensor:  # old units keep their place, extras copy random ones
        return torch.cat([torch.arange(old), torch.randint(0, old, (new - old,), generator=generator)])

    heads = keep_and_draw(narrow.num_attention_heads, wide.num_attention_heads)
    attention_rows = (heads[:, None] * narrow.head_dim + torch.arange(narrow.head_dim)).flatten()
    maps = {"hidden": torch.arange(wide.hidden_size) % narrow.hidden_size, "attention": attention_rows,
            "mlp": keep_and_draw(narrow.intermediate_size, wide.intermediate_size)}
    return WidthMaps(maps, narrow.widths)


def cyclic_maps(narrow_widths: dict[str, int], wide_widths: dict[str, int]) -> WidthMaps:
    """Unit ``j`` maps to ``j mod n`` in every width. On the attention rows this maps whole heads
    (head ``j`` to head ``j mod h``) when both models have the same ``head_dim``."""
    return WidthMaps({width: torch.arange(wide_widths[width]) % narrow_widths[width] for width in narrow_widths},
                     dict(narrow_widths))


def layer_map(narrow_layers: int, wide_layers: int, depth: DepthMap) -> list[int]:
    """The narrow layer each wide layer copies (growing) or is merged into (coalescing)."""
    if depth == "stack":
        return [k % narrow_layers for k in range(wide_layers)]
    return [k * narrow_layers // wide_layers for k in range(wide_layers)]


def _layer_keys(state: StateDict) -> int:
    return len({key.split(".")[2] for key in state if key.startswith("model.layers.")})


def grow_state_dict(narrow_state: StateDict, maps: WidthMaps, wide_layers: int, init: GrowthInit = "fpi",
                    depth: DepthMap = "stack") -> StateDict:
    """The wide model's weights grown from the narrow model's (FPI or AKI, then depth)."""
    def grow(own: torch.Tensor, upper: torch.Tensor | None, rows: str | None, cols: str | None) -> torch.Tensor:
        grown = own.to(torch.float64)
        if rows is not None:
            grown = grown[maps.maps[rows]]
            if upper is not None:  # AKI: the new units' rows come from the layer above
                n_old = maps.narrow[rows]
                grown[n_old:] = upper.to(torch.float64)[maps.maps[rows][n_old:]]
        if cols is not None:
            grown = grown[:, maps.maps[cols]] / maps.counts(cols)[maps.maps[cols]]
        return grown.to(own.dtype)

    n_layers = _layer_keys(narrow_state)
    hid = maps.maps["hidden"]
    grown = {"model.embed_tokens.weight": narrow_state["model.embed_tokens.weight"][:, hid].clone(),
             "model.norm.weight": narrow_state["model.norm.weight"][hid].clone(),
             "lm_head.weight": grow(narrow_state["lm_head.weight"], None, None, "hidden")}
    wide_per_narrow_layer = []
    for layer in range(n_layers):
        upper = min(layer + 1, n_layers - 1)
        tensors = {}
        for module, (rows, cols) in _LAYOUT.items():
            above = narrow_state[f"model.layers.{upper}.{module}.weight"] if init == "aki" else None
            tensors[f"{module}.weight"] = grow(narrow_state[f"model.layers.{layer}.{module}.weight"], above, rows, cols)
        for norm in _NORMS:
            tensors[f"{norm}.weight"] = narrow_state[f"model.layers.{layer}.{norm}.weight"][hid].clone()
        wide_per_narrow_layer.append(tensors)
    for new, source in enumerate(layer_map(n_layers, wide_layers, depth)):
        for name, tensor in wide_per_narrow_layer[source].items():
            grown[f"model.layers.{new}.{name}"] = tensor.clone()
    return grown


def coalesce_state_dict(wide_state: StateDict, maps: WidthMaps, narrow_layers: int,
                        depth: DepthMap = "interpolate") -> StateDict:
    """The narrow model's weights coalesced from the wide model's: rows mapped to one unit are
    averaged, columns mapped to one unit summed, and layers mapped to one layer averaged."""
    def coalesce(wide: torch.Tensor, rows: str | None, cols: str | None) -> torch.Tensor:
        out = wide.to(torch.float64)
        if rows is not None:
            summed = torch.zeros(maps.narrow[rows], *out.shape[1:], dtype=torch.float64)
            out = summed.index_add_(0, maps.maps[rows], out) / maps.counts(rows).view(-1, *[1] * (out.ndim - 1))
        if cols is not None:
            out = torch.zeros(out.shape[0], maps.narrow[cols], dtype=torch.float64).index_add_(1, maps.maps[cols], out)
        return out

    def cast(tensor: torch.Tensor, like: str) -> torch.Tensor:
        return tensor.to(wide_state[like].dtype)

    wide_layers = _layer_keys(wide_state)
    embed = "model.embed_tokens.weight"
    narrow = {embed: cast(coalesce(wide_state[embed].T, "hidden", None).T.contiguous(), embed),
              "model.norm.weight": cast(coalesce(wide_state["model.norm.weight"], "hidden", None), "model.norm.weight"),
              "lm_head.weight": cast(coalesce(wide_state["lm_head.weight"], None, "hidden"), "lm_head.weight")}
    groups: dict[int, list[int]] = {}
    for wide_layer, narrow_layer in enumerate(layer_map(narrow_layers, wide_layers, depth)):
        groups.setdefault(narrow_layer, []).append(wide_layer)
    names = [(f"{module}.weight", rows, cols) for module, (rows, cols) in _LAYOUT.items()]
    names += [(f"{norm}.weight", "hidden", None) for norm in _NORMS]
    for narrow_layer, members in groups.items():
        for name, rows, cols in names:
            keys = [f"model.layers.{k}.{name}" for k in members]
            mean = sum(coalesce(wide_state[key], rows, cols) for key in keys) / len(keys)
            narrow[f"model.layers.{narrow_layer}.{name}"] = cast(mean, keys[0])
    return narrow


def state_dict_widths(state: StateDict) -> tuple[dict[str, int], int]:
    """A Llama's widths (hidden, attention rows, MLP units) and layer count, read from its weights."""
    widths = {"hidden": state["model.embed_tokens.weight"].shape[1],
              "attention": state["model.layers.0.self_attn.q_proj.weight"].shape[0],
              "mlp": state["model.layers.0.mlp.gate_proj.weight"].shape[0]}
    return widths, _layer_keys(state)


def decoalesce_state_dict(narrow_state: StateDict, wide_like: StateDict, depth: DepthMap = "interpolate") -> StateDict:
    """The V-cycle's de-coalescing: ``narrow_state`` grown (FPI over cyclic maps) to the shapes of
    ``wide_like``, whose every width and layer count must be a whole multiple of the narrow one's."""
    narrow, narrow_layers = state_dict_widths(narrow_state)
    wide, wide_layers = state_dict_widths(wide_like)
    pairs = {**{f"{width} width": (narrow[width], wide[width]) for width in narrow},
             "layer count": (narrow_layers, wide_layers)}
    for name, (small, large) in pairs.items():
        if large < small or large % small:
            raise ValueError(f"de-coalescing needs the larger model's {name} to be a whole multiple of the smaller "
                             f"model's; {large} is not a multiple of {small}")
    return grow_state_dict(narrow_state, cyclic_maps(narrow, wide), wide_layers, "fpi", depth)


def resized_llama(like: LlamaForCausalLM, sizes: LlamaSizes, state: StateDict) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with ``like``'s config at ``sizes``, holding ``state``."""
    config = LlamaConfig.from_dict({**like.config.to_dict(), **sizes.as_dict(),
                                    "num_key_value_heads": sizes.num_attention_heads, "head_dim": sizes.head_dim})
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG alone
        model = LlamaForCausalLM(config).to(like.dtype)
    model.load_state_dict(state, strict=True)
    return model.train(like.training)


def grow_llama(small: LlamaForCausalLM, *, hidden_size: int, num_attention_heads: int, intermediate_size: int,
               num_hidden_layers: int, init: GrowthInit = "fpi", depth: DepthMap = "stack",
               extras: Extras = "random", generator: torch.Generator | None = None) -> LlamaForCausalLM:
    """A new, larger ``LlamaForCausalLM`` grown from ``small`` (left unchanged)."""
    check_llama(small, "growth")
    narrow = LlamaSizes.of(small.config)
    wide = LlamaSizes(hidden_size, num_attention_heads, intermediate_size, num_hidden_layers,
                      head_dim=hidden_size // num_attention_heads)
    check_sizes(narrow, wide, extras, "growth")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    maps = width_maps(narrow, wide, extras, generator)
    with torch.no_grad():
        state = grow_state_dict(small.state_dict(), maps, num_hidden_layers, init, depth)
    return resized_llama(small, wide, state)


def coalesce_llama(large: LlamaForCausalLM, *, width_factor: int, depth_factor: int,
                   depth: DepthMap = "interpolate") -> LlamaForCausalLM:
    """A new ``LlamaForCausalLM`` ``width_factor`` times narrower and ``depth_factor`` times
    shallower, coalesced from ``large`` (left unchanged) over cyclic maps."""
    check_llama(large, "coalescing")
    wide = LlamaSizes.of(large.config)
    shrunk = {"hidden_size": wide.hidden_size, "num_attention_heads": wide.num_attention_heads,
              "intermediate_size": wide.intermediate_size}
    for key, size in shrunk.items():
        if size % width_factor:
            raise ValueError(f"coalescing by width_factor={width_factor}: {key}={size} is not divisible by it")
    if wide.num_hidden_layers % depth_factor:
        raise ValueError(f"coalescing by depth_factor={depth_factor}: num_hidden_layers={wide.num_hidden_layers} "
                         "is not divisible by it")
    narrow = LlamaSizes(*(size // width_factor for size in shrunk.values()),
                        num_hidden_layers=wide.num_hidden_layers // depth_factor, head_dim=wide.head_dim)
    maps = width_maps(narrow, wide, "cyclic")
    with torch.no_grad():
        state = coalesce_state_dict(large.state_dict(), maps, narrow.num_hidden_layers, depth)
    return resized_llama(large, narrow, state)


def swap_into(model: LlamaForCausalLM, resized: LlamaForCausalLM) -> None:
    """Make ``model`` the ``resized`` model in place (the trainer holds ``model``)."""
    device = next(model.parameters()).device
    resized.to(device)
    model.model, model.lm_head, model.config = resized.model, resized.lm_head, resized.config
