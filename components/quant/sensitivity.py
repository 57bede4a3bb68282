"""Layer sensitivity tools for mixed-precision bit allocation (HAWQ, HAWQ-V2, inter-layer Hessians).

Second-order view: quantizing weights ``w`` by ``Δw`` changes the loss by about
``½ Δwᵀ H Δw`` (the gradient of a trained model is ~0). Methods differ in how they
summarise ``H`` per layer and how they pick bits:

- ``hutchinson_trace`` / ``hutchinson_traces``: ``Tr(H_i)`` via Rademacher probes
  ``E[vᵀHv] = Tr(H)`` (HAWQ-V2; PyHessian defaults ``maxIter=100``, ``tol=1e-3``).
- ``top_eigenvalue`` / ``top_eigenvalues``: power iteration on Hessian-vector products (HAWQ).
- ``pairwise_loss_terms``: measured single-layer ``ΔL_i(b)`` and cross terms
  ``Δ_ij = L(Q_i, Q_j) - L(Q_i) - L(Q_j) + L0`` (CLADO-style; inter-layer dependencies).
- ``allocate_bits_milp``: one-hot bits per layer, total-size constraint, ``scipy.optimize.milp``.
- ``allocate_bits_pairwise``: the same plus pairwise terms (exact linearised MILP, or
  exhaustive search for small cases); ``bisect_budget``: smallest size budget within a
  loss-increase bound.
- ``pareto_frontier``: non-dominated (size, cost) points (HAWQ-V2 Fig. 4).

Hessian-vector products use double backward (``torch.autograd.grad(..., create_graph=True)``).
The first-order graph is built once and reused for every probe (``retain_graph=True``), as
PyHessian does for a single batch. The CPU SDPA attention kernel has no double backward, so
HF models are switched to eager attention while Hessians are computed.

Sizes and budgets are in bits of weight codes (``Σ n_i·b_i``); fp16 scales are not counted.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, PackedWeights, QuantizationError, QuantizedModel, Quantizer
from components.quant.calibration import capture_block_inputs, decoder_blocks, swapped_weights
from components.quant.rtn import quantize_tensor

LossClosure = Callable[[], torch.Tensor]

# Bit widths an RTN grid can have (as ``RtnQuantizer.Params.bits``): packing stores 1..8, but a
# symmetric 1-bit grid has no levels (qmax = 0).
ALLOCATABLE_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_alloc_bits(method: str, bits) -> None:
    """Like ``base.check_bits``, for the widths a mixed-precision RTN allocation may use."""
    if bits not in ALLOCATABLE_BITS:
        raise QuantizationError(f"{method}: unsupported bits={bits!r}; RTN grids support bits {list(ALLOCATABLE_BITS)}")


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------

def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Differentiable mean next-token cross-entropy of ``model`` on one batch ``[n, seq_len]``."""
    logits = model(input_ids=tokens, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def loss_fn(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over every predicted token of ``tokens`` (batched, no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size]
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(next_token_loss(model, batch)) * n
            count += n
    if count == 0:
        raise QuantizationError("loss_fn: no predicted tokens (need sequences of at least 2 tokens)")
    return total / count


def make_loss_closure(model: torch.nn.Module, tokens: torch.Tensor) -> LossClosure:
    """A closure returning the differentiable mean next-token loss on ``tokens`` (one batch)."""
    return lambda: next_token_loss(model, tokens)


@contextmanager
def hessian_mode(model: torch.nn.Module, params: Sequence[torch.Tensor]):
    """Eval mode, eager attention, and ``requires_grad`` only on ``params``; restored afterwards."""
    wanted = {id(p) for p in params}
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    config = getattr(model, "config", None)
    saved_attn = getattr(config, "_attn_implementation", None)
    switch = saved_attn not in (None, "eager") and hasattr(model, "set_attn_implementation")
    try:
        model.eval()
        if switch:
            model.set_attn_implementation("eager")  # CPU SDPA has no double backward
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved_grad:
            p.requires_grad_(flag)
        if switch:
            model.set_attn_implementation(saved_attn)
        model.train(was_training)


def _first_order(params: list[torch.Tensor], loss_closure: LossClosure):
    loss = loss_closure()
    return torch.autograd.grad(loss, params, create_graph=True)


def _dot(xs, ys) -> float:
    return float(sum((x * y).sum() for x, y in zip(xs, ys)))


def _flatten_blocks(blocks: Mapping[str, Sequence[torch.Tensor]]):
    names = list(blocks)
    if not names:
        raise QuantizationError("no parameter blocks given")
    params, owner = [], []
    for name in names:
        if len(blocks[name]) == 0:
            raise QuantizationError(f"parameter block {name!r} is empty")
        for p in blocks[name]:
            params.append(p)
            owner.append(name)
    return names, params, owner


# --------------------------------------------------------------------------------------------
# Hessian trace (Hutchinson) and top eigenvalue (power iteration)
# --------------------------------------------------------------------------------------------

def hutchinson_traces(model: torch.nn.Module, blocks: Mapping[str, Sequence[torch.Tensor]],
                      loss_closure: LossClosure, n_samples: int = 100, tol: float = 1e-3,
                      seed: int = 0) -> tuple[dict[str, float], int]:
    """``Tr(H_ii)`` of every block from shared probes; returns ``(traces, samples used)``.

    One Rademacher vector ``v`` spans all blocks and one Hessian-vector product gives
    ``v_iᵀ(Hv)_i = v_iᵀH_ii v_i + Σ_{j≠i} v_iᵀH_ij v_j`` per block. The cross terms have zero
    mean (independent signs), so each is an unbiased estimate of ``Tr(H_ii)`` at the cost of
    one HVP for all blocks (the cross terms add variance). With a single block this is plain
    Hutchinson. Stops when every block's running mean moved by less than ``tol`` relative
    (PyHessian's rule) or after ``n_samples`` probes."""
    if n_samples < 1:
        raise QuantizationError(f"hutchinson: n_samples={n_samples!r} must be >= 1")
    names, params, owner = _flatten_blocks(blocks)
    gen = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(names, 0.0)
    means = dict.fromkeys(names, 0.0)
    with hessian_mode(model, params):
        grads = _first_order(params, loss_closure)
        used = 0
        for k in range(n_samples):
            vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=k < n_samples - 1)
            per_block = dict.fromkeys(names, 0.0)
            for name, v, h in zip(owner, vs, hv):
                per_block[name] += float((v * h).sum())
            used = k + 1
            converged = True
            for name in names:
                sums[name] += per_block[name]
                new = sums[name] / used
                if abs(new - means[name]) / (abs(means[name]) + 1e-6) >= tol:
                    converged = False
                means[name] = new
            if converged and used > 1:
                break
    return means, used


def hutchinson_trace(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_closure: LossClosure,
                     n_samples: int = 100, tol: float = 1e-3, seed: int = 0) -> float:
    """Hutchinson estimate of ``Tr(H)`` of the loss w.r.t. the block ``params``."""
    traces, _ = hutchinson_traces(model, {"block": list(params)}, loss_closure, n_samples, tol, seed)
    return traces["block"]


def top_eigenvalues(model: torch.nn.Module, blocks: Mapping[str, Sequence[torch.Tensor]],
                    loss_closure: LossClosure, iters: int = 100, tol: float = 1e-3,
                    seed: int = 0) -> tuple[dict[str, float], dict[str, int]]:
    """Largest-magnitude eigenvalue of each diagonal block ``H_ii`` by power iteration.

    The first-order graph is built once for all blocks; ``H_ii v_i = ∂(g_i·v_i)/∂w_i`` then
    needs one backward per iteration and block. Stops a block when the Rayleigh quotient
    moved by less than ``tol`` relative (PyHessian's rule). Returns ``(eigenvalues, iterations)``."""
    if iters < 1:
        raise QuantizationError(f"power iteration: iters={iters!r} must be >= 1")
    names, params, owner = _flatten_blocks(blocks)
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, float] = {}
    used: dict[str, int] = {}
    with hessian_mode(model, params):
        grads = _first_order(params, loss_closure)
        for name in names:
            idx = [k for k, o in enumerate(owner) if o == name]
            ps = [params[k] for k in idx]
            gs = [grads[k] for k in idx]
            v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]
            norm = math.sqrt(_dot(v, v))
            v = [x / norm for x in v]
            eig = None
            for it in range(iters):
                hv = torch.autograd.grad(gs, ps, grad_outputs=v, retain_graph=True)
                new = _dot(hv, v)  # Rayleigh quotient, v has unit norm
                norm = math.sqrt(_dot(hv, hv))
                used[name] = it + 1
                if norm == 0.0:
                    eig = 0.0
                    break
                v = [h / norm for h in hv]
                if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
                    eig = new
                    break
                eig = new
            values[name] = float(eig)
        del grads
    return values, used


def top_eigenvalue(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_closure: LossClosure,
                   iters: int = 100, tol: float = 1e-3, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of the loss Hessian w.r.t. ``params`` (power iteration)."""
    values, _ = top_eigenvalues(model, {"block": list(params)}, loss_closure, iters, tol, seed)
    return values["block"]


# --------------------------------------------------------------------------------------------
# quantization errors and measured loss terms
# --------------------------------------------------------------------------------------------

Quantize = Callable[[torch.Tensor, int, str], torch.Tensor]


def rtn_quantize(granularity: str = "per_channel", group_size: int = 128, symmetric: bool = True) -> Quantize:
    """``(weight, bits, name) -> dequantized weight`` with the RTN grid of ``rtn.quantize_tensor``."""
    def run(weight, bits, name="weight"):
        return quantize_tensor(weight.detach().float(), bits, granularity, group_size, symmetric, name)[3]
    return run


def quantization_errors(weights: Mapping[str, torch.Tensor], bits_options: Sequence[int],
                        quantize: Quantize) -> dict[str, dict[int, float]]:
    """``||Q_b(W) - W||²`` for every weight and bit width."""
    return {name: {b: float(((quantize(w, b, name) - w.detach().float()) ** 2).sum()) for b in bits_options}
            for name, w in weights.items()}


@dataclass
class PairwiseTerms:
    """Measured loss terms: ``single[u][b] = L(Q_u^b) - L0`` and
    ``pair[(u, v)][(b_u, b_v)] = L(Q_u^{b_u}, Q_v^{b_v}) - L(Q_u^{b_u}) - L(Q_v^{b_v}) + L0``."""

    base_loss: float
    single: dict[str, dict[int, float]]
    pair: dict[tuple[str, str], dict[tuple[int, int], float]] = field(default_factory=dict)
    evaluations: int = 0


def _units(layers) -> dict[str, list[str]]:
    if isinstance(layers, Mapping):
        units = {u: list(ms) for u, ms in layers.items()}
    else:
        units = {m: [m] for m in layers}
    if not units or any(not ms for ms in units.values()):
        raise QuantizationError(f"pairwise_loss_terms: no layers to measure ({layers!r})")
    return units


def pairwise_loss_terms(model: torch.nn.Module, layers, bits_options: Sequence[int],
                        calibration: torch.Tensor | None = None, *, quantize: Quantize | None = None,
                        pair_bits: Sequence[int] | None = None, loss: Callable[[], float] | None = None,
                        batch_size: int = 8) -> PairwiseTerms:
    """Measure ``ΔL`` of quantizing each unit alone and each pair of units together.

    ``layers``: module names (one unit each) or ``{unit: [module names]}`` (a unit's modules
    share one bit width). ``pair_bits``: bit widths whose pairs are measured (default: all
    of ``bits_options``); pairs involving other widths get no entry (treated as 0).
    ``loss``: a no-argument callable evaluating the current model (weights are swapped in
    place); default: mean next-token CE on ``calibration``, computed block by block for
    Llama-style models, reusing the hidden states of the unquantized prefix and of each
    single-unit run, so a pair only re-runs the blocks from the later unit on."""
    units = _units(layers)
    bits_options = list(bits_options)
    if not bits_options:
        raise QuantizationError("pairwise_loss_terms: bits_options is empty ([])")
    pair_bits = bits_options if pair_bits is None else [b for b in bits_options if b in set(pair_bits)]
    modules = dict(model.named_modules())
    missing = [m for ms in units.values() for m in ms if m not in modules]
    if missing:
        raise QuantizationError(f"pairwise_loss_terms: no modules named {missing}")
    quantize = quantize or rtn_quantize()
    dequant = {(m, b): quantize(modules[m].weight.detach(), b, f"{m}.weight").to(modules[m].weight.dtype)
               for ms in units.values() for m in ms for b in bits_options}

    def config(assign: Mapping[str, int]) -> dict[str, torch.Tensor]:
        return {m: dequant[(m, b)] for u, b in assign.items() for m in units[u]}

    names = list(units)
    if loss is not None:
        def measure(assign):
            with torch.no_grad(), swapped_weights(modules, config(assign)):
                return float(loss())
        base = measure({})
        single = {u: {b: measure({u: b}) - base for b in bits_options} for u in names}
        pair: dict = {}
        evaluations = 1 + len(names) * len(bits_options)
        for u, v in itertools.combinations(names, 2):
            pair[(u, v)] = {(bu, bv): measure({u: bu, v: bv}) - single[u][bu] - single[v][bv] - base
                            for bu in pair_bits for bv in pair_bits}
            evaluations += len(pair_bits) ** 2
        return PairwiseTerms(base, single, pair, evaluations)

    if calibration is None:
        raise QuantizationError("pairwise_loss_terms: needs calibration tokens or a loss callable")
    return _pairwise_blockwise(model, units, bits_options, pair_bits, calibration, modules, config, batch_size)


def _block_of(module_name: str) -> int:
    parts = module_name.split(".")
    try:
        return int(parts[parts.index("layers") + 1])
    except (ValueError, IndexError):
        raise QuantizationError(f"pairwise_loss_terms: {module_name} is not inside model.layers.<i>") from None


def _pairwise_blockwise(model, units, bits_options, pair_bits, calibration, modules, config, batch_size):
    blocks = decoder_blocks(model)
    n_blocks = len(blocks)
    tokens = calibration.long()
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, tokens, batch_size)
    targets = [tokens[k * batch_size:k * batch_size + h.shape[0], 1:] for k, h in enumerate(inputs.batches)]
    kwargs = inputs.kwargs
    head_norm = model.model.norm
    lm_head = model.lm_head
    span = {u: (min(_block_of(m) for m in ms), max(_block_of(m) for m in ms)) for u, ms in units.items()}

    def run_from(start: int, hidden: list[torch.Tensor], keep: bool):
        """Blocks ``start..`` then the head; returns (mean CE, {block k: its input batches})."""
        cached = {}
        with torch.no_grad():
            for k in range(start, n_blocks):
                if keep:
                    cached[k] = hidden
                hidden = [blocks[k](h, **kwargs) for h in hidden]
            total, count = 0.0, 0
            for h, y in zip(hidden, targets):
                logits = lm_head(head_norm(h))[:, :-1]
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
                count += y.numel()
        return total / count, cached

    try:
        base, fp_inputs = run_from(0, inputs.batches, keep=True)
        names = list(units)
        single: dict[str, dict[int, float]] = {}
        after: dict[tuple[str, int], dict[int, list[torch.Tensor]]] = {}
        evaluations = 1
        for u in names:
            single[u] = {}
            for b in bits_options:
                with swapped_weights(modules, config({u: b})):
                    value, cached = run_from(span[u][0], fp_inputs[span[u][0]], keep=b in pair_bits)
                evaluations += 1
                single[u][b] = value - base
                if b in pair_bits:
                    after[(u, b)] = {k: h for k, h in cached.items() if k > span[u][1]}
        pair: dict = {}
        for u, v in itertools.combinations(names, 2):
            first, second = (u, v) if span[u][0] <= span[v][0] else (v, u)
            start = span[second][0]
            terms = {}
            for bu in pair_bits:
                for bv in pair_bits:
                    bits = {u: bu, v: bv}
                    reuse = after[(first, bits[first])].get(start)
                    with swapped_weights(modules, config(bits)):
                        if reuse is not None:  # `first` lies wholly before `second`'s block
                            value, _ = run_from(start, reuse, keep=False)
                        else:
                            s = span[first][0]
                            value, _ = run_from(s, fp_inputs[s], keep=False)
                    evaluations += 1
                    terms[(bu, bv)] = value - single[u][bu] - single[v][bv] - base
            pair[(u, v)] = terms
    finally:
        model.train(was_training)
    return PairwiseTerms(base, single, pair, evaluations)


# --------------------------------------------------------------------------------------------
# bit allocation
# --------------------------------------------------------------------------------------------

def _check_allocation_inputs(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                             budget_bits: float) -> list[str]:
    layers = list(costs)
    if not layers:
        raise QuantizationError("bit allocation: no layers given")
    for layer in layers:
        if layer not in sizes:
            raise QuantizationError(f"bit allocation: no size for layer {layer!r}")
        if not costs[layer]:
            raise QuantizationError(f"bit allocation: layer {layer!r} has no bit options (bits_options=[])")
        for b in costs[layer]:
            check_alloc_bits("bit allocation", b)
    minimum = sum(sizes[layer] * min(costs[layer]) for layer in layers)
    if budget_bits < minimum - 1e-9:
        total = sum(sizes[layer] for layer in layers)
        raise QuantizationError(
            f"bit allocation: budget {budget_bits:g} bits ({budget_bits / total:.4g} bits per weight) is "
            f"below the smallest possible size {minimum} bits ({minimum / total:.4g} bits per weight, "
            "every layer at its lowest bit width)")
    return layers


def allocate_bits_milp(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], budget_bits: float,
                       time_limit: float | None = None) -> dict[str, int]:
    """``min Σ_i costs[i][b_i]`` s.t. ``Σ_i sizes[i]·b_i ≤ budget_bits``, one bit width per layer.

    One binary ``x_ib`` per (layer, bits) with ``Σ_b x_ib = 1``; solved exactly by HiGHS
    (``scipy.optimize.milp``, ``mip_rel_gap=0``). Ties go to larger widths (``_spend_leftover``)."""
    return allocate_bits_pairwise(costs, {}, sizes, budget_bits, method="milp", time_limit=time_limit)[0]


def allocation_cost(alloc: Mapping[str, int], costs: Mapping[str, Mapping[int, float]],
                    pairs: Mapping[tuple[str, str], Mapping[tuple[int, int], float]] | None = None) -> float:
    """``Σ_i c_i(b_i) + Σ_{i<j} Δ_ij(b_i, b_j)`` (missing pair entries count 0)."""
    total = sum(costs[layer][b] for layer, b in alloc.items())
    for (u, v), terms in (pairs or {}).items():
        total += terms.get((alloc[u], alloc[v]), 0.0)
    return float(total)


def allocation_size(alloc: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    return int(sum(sizes[layer] * b for layer, b in alloc.items()))


def allocate_bits_pairwise(costs: Mapping[str, Mapping[int, float]],
                           pairs: Mapping[tuple[str, str], Mapping[tuple[int, int], float]],
                           sizes: Mapping[str, int], budget_bits: float, method: str = "auto",
                           time_limit: float | None = None) -> tuple[dict[str, int], float]:
    """``min Σ_i c_i(b_i) + Σ_{i<j} Δ_ij(b_i, b_j)`` under ``Σ sizes·b ≤ budget_bits``.

    ``method="milp"``: exact linearisation with product variables ``y_ij,ab = x_ia·x_jb``
    written as ``Σ_b y_ij,ab = x_ia``, ``Σ_a y_ij,ab = x_jb``, ``y ≥ 0`` (exact for one-hot
    binary ``x``, and a tighter relaxation than McCormick). ``method="exhaustive"``: every
    configuration (for tests and ≤ ~10 layers). ``auto`` = milp. Returns ``(bits, objective)``."""
    layers = _check_allocation_inputs(costs, sizes, budget_bits)
    if method == "exhaustive":
        alloc, _ = _exhaustive(layers, costs, pairs, sizes, budget_bits)
        return _spend_leftover(alloc, costs, pairs, sizes, budget_bits)
    if method not in ("milp", "auto"):
        raise QuantizationError(f"bit allocation: unknown method {method!r}; use milp, exhaustive or auto")
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    options = {layer: sorted(costs[layer]) for layer in layers}
    x_index = {}
    for layer in layers:
        for b in options[layer]:
            x_index[(layer, b)] = len(x_index)
    active = [(u, v) for (u, v), terms in pairs.items() if any(t != 0.0 for t in terms.values())]
    for u, v in active:
        if u not in costs or v not in costs:
            raise QuantizationError(f"bit allocation: pair ({u!r}, {v!r}) names a layer without costs")
    y_index = {}
    for u, v in active:
        for a in options[u]:
            for b in options[v]:
                y_index[(u, v, a, b)] = len(x_index) + len(y_index)
    n_var = len(x_index) + len(y_index)
    c = np.zeros(n_var)
    for (layer, b), k in x_index.items():
        c[k] = costs[layer][b]
    for (u, v, a, b), k in y_index.items():
        c[k] = pairs[(u, v)].get((a, b), 0.0)
    n_rows = len(layers) + 1 + sum(len(options[u]) + len(options[v]) for u, v in active)
    A = lil_matrix((n_rows, n_var))
    lower = np.zeros(n_rows)
    upper = np.zeros(n_rows)
    row = 0
    for layer in layers:  # one bit width per layer
        for b in options[layer]:
            A[row, x_index[(layer, b)]] = 1.0
        lower[row] = upper[row] = 1.0
        row += 1
    for (layer, b), k in x_index.items():  # size budget
        A[row, k] = float(sizes[layer] * b)
    lower[row], upper[row] = -np.inf, float(budget_bits)
    row += 1
    for u, v in active:  # product variables: marginals equal the one-hot choices
        for a in options[u]:
            for b in options[v]:
                A[row, y_index[(u, v, a, b)]] = 1.0
            A[row, x_index[(u, a)]] = -1.0
            row += 1
        for b in options[v]:
            for a in options[u]:
                A[row, y_index[(u, v, a, b)]] = 1.0
            A[row, x_index[(v, b)]] = -1.0
            row += 1
    integrality = np.zeros(n_var)
    integrality[:len(x_index)] = 1
    opts = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        opts["time_limit"] = float(time_limit)
    # rescale the objective so HiGHS' absolute tolerances do not swamp tiny costs
    scale = float(np.abs(c).max()) or 1.0
    res = milp(c / scale, constraints=LinearConstraint(A.tocsr(), lower, upper), integrality=integrality,
               bounds=Bounds(np.zeros(n_var), np.ones(n_var)), options=opts)
    if res.x is None:
        raise QuantizationError(f"bit allocation: MILP found no solution ({res.message})")
    alloc = {}
    for layer in layers:
        alloc[layer] = max(options[layer], key=lambda b: res.x[x_index[(layer, b)]])
    if allocation_size(alloc, sizes) > budget_bits + 1e-6:
        raise QuantizationError("bit allocation: MILP solution exceeds the budget (solver tolerance)")
    return _spend_leftover(alloc, costs, pairs, sizes, budget_bits)


def _spend_leftover(alloc, costs, pairs, sizes, budget_bits):
    """Tie-break: raise a layer's bits while the budget allows and the objective does not grow.

    Layers whose cost is flat in the bit width (e.g. zero estimated curvature) would otherwise
    get an arbitrary width; this hands them leftover budget instead, largest layers first."""
    alloc = dict(alloc)
    cost = allocation_cost(alloc, costs, pairs)
    for layer in sorted(alloc, key=lambda m: (-sizes[m], m)):
        for b in sorted((b for b in costs[layer] if b > alloc[layer]), reverse=True):
            trial = {**alloc, layer: b}
            if allocation_size(trial, sizes) > budget_bits + 1e-9:
                continue
            new = allocation_cost(trial, costs, pairs)
            if new <= cost:
                alloc, cost = trial, new
                break
    return alloc, cost


def _exhaustive(layers, costs, pairs, sizes, budget_bits):
    best, best_cost = None, math.inf
    for combo in itertools.product(*[sorted(costs[layer]) for layer in layers]):
        alloc = dict(zip(layers, combo))
        if allocation_size(alloc, sizes) > budget_bits + 1e-9:
            continue
        cost = allocation_cost(alloc, costs, pairs)
        if cost < best_cost - 1e-15:
            best, best_cost = alloc, cost
    if best is None:  # unreachable: the budget was checked against the minimum size
        raise QuantizationError("bit allocation: no configuration fits the budget")
    return best, best_cost


def monotone_allocation(ranking: Sequence[str], costs: Mapping[str, Mapping[int, float]],
                        sizes: Mapping[str, int], budget_bits: float) -> dict[str, int]:
    """HAWQ's ordering rule: bits never increase along ``ranking`` (most sensitive first).

    Among all such assignments within the budget (``C(L+B-1, B-1)`` of them) returns the one
    with the smallest ``Σ costs`` (ties: the larger one)."""
    layers = _check_allocation_inputs(costs, sizes, budget_bits)
    if sorted(ranking) != sorted(layers):
        raise QuantizationError("monotone allocation: ranking must list every layer once")
    bit_levels = sorted({b for layer in layers for b in costs[layer]}, reverse=True)
    best, best_key = None, None
    n = len(ranking)
    # cut points 0 <= c_1 <= ... <= c_{B-1} <= n: ranks [c_{k-1}, c_k) get bit_levels[k-1]
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(bit_levels) - 1):
        bounds = (0, *cuts, n)
        alloc = {}
        for level, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            for layer in ranking[lo:hi]:
                alloc[layer] = bit_levels[level]
        if any(alloc[layer] not in costs[layer] for layer in layers):
            continue
        size = allocation_size(alloc, sizes)
        if size > budget_bits + 1e-9:
            continue
        key = (allocation_cost(alloc, costs), -size)
        if best_key is None or key < best_key:
            best, best_key = alloc, key
    if best is None:
        raise QuantizationError("monotone allocation: no assignment fits the budget")
    return best


def bisect_budget(solve: Callable[[float], dict[str, int]], loss_increase: Callable[[dict[str, int]], float],
                  low_bits: float, high_bits: float, max_loss_increase: float,
                  resolution_bits: float) -> tuple[dict[str, int], float, list[dict]]:
    """Smallest size budget in ``[low_bits, high_bits]`` whose allocation stays within the bound.

    ``solve(budget) -> allocation``; ``loss_increase(allocation)`` is predicted or measured.
    Assumes the loss increase falls as the budget grows (bisection); stops when the bracket
    is narrower than ``resolution_bits``. Returns ``(allocation, its loss increase, trace)``."""
    trace = []

    def probe(budget):
        alloc = solve(budget)
        value = float(loss_increase(alloc))
        trace.append(dict(budget_bits=float(budget), loss_increase=value))
        return alloc, value

    best, best_value = probe(high_bits)
    if best_value > max_loss_increase:
        raise QuantizationError(
            f"max_loss_increase={max_loss_increase:g} cannot be met: even the largest configuration "
            f"({high_bits:g} bits) increases the loss by {best_value:.4g}")
    lo, hi = float(low_bits), float(high_bits)
    alloc, value = probe(lo)
    if value <= max_loss_increase:
        return alloc, value, trace
    while hi - lo > resolution_bits:
        mid = (lo + hi) / 2
        alloc, value = probe(mid)
        if value <= max_loss_increase:
            hi, best, best_value = mid, alloc, value
        else:
            lo = mid
    return best, best_value, trace


def pareto_frontier(points: Iterable[Sequence]) -> list[tuple]:
    """Points ``(size, cost, *payload)`` not dominated by another (smaller-or-equal size and
    cost, one strictly), sorted by size; cost strictly falls along the result."""
    ordered = sorted((tuple(p) for p in points), key=lambda p: (p[0], p[1]))
    frontier = []
    for p in ordered:
        if not frontier or p[1] < frontier[-1][1]:
            if frontier and frontier[-1][0] == p[0]:
                continue  # same size, higher cost (sorted by cost within a size)
            frontier.append(p)
    return frontier


def milp_frontier(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                  budgets_bits: Iterable[float]) -> list[tuple[int, float, dict[str, int]]]:
    """The Pareto frontier of (size, Σ cost) traced by solving the MILP at each budget."""
    points = []
    for budget in budgets_bits:
        alloc = allocate_bits_milp(costs, sizes, budget)
        points.append((allocation_size(alloc, sizes), allocation_cost(alloc, costs), alloc))
    return pareto_frontier(points)


# --------------------------------------------------------------------------------------------
# shared quantizer plumbing for mixed-precision methods
# --------------------------------------------------------------------------------------------

class MixedPrecisionParams(CalibratedParams):
    bits_options: list[int] = Field([2, 4, 8], min_length=1, description="bit widths a layer may get")
    average_bits: float = Field(4.0, gt=0, description="budget: weighted mean code bits per quantized "
                                                          "weight (fp16 scales not counted)")
    granularity: Literal["per_tensor", "per_channel", "group"] = Field(
        "per_channel", description="RTN scale granularity, as in `rtn`")
    group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
    symmetric: bool = Field(True, description="symmetric RTN grid (no stored zero points)")
    hessian_sequences: int = Field(8, gt=0, description="calibration sequences in the Hessian batch")

    @field_validator("bits_options")
    @classmethod
    def _bits(cls, value: list[int]) -> list[int]:
        bad = [b for b in value if b not in ALLOCATABLE_BITS]
        if bad:
            raise ValueError(f"bits_options={value}: unsupported bits {bad}; supported: {list(ALLOCATABLE_BITS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"bits_options={value} has duplicates")
        return sorted(value)


def check_mixed_params(method: str, params) -> list[int]:
    """Runtime checks (params may be built with ``model_construct``)."""
    options = list(params.bits_options or [])
    if not options:
        raise QuantizationError(f"{method}: bits_options={options!r} is empty; give at least one bit width")
    for b in options:
        check_alloc_bits(method, b)
    if not params.average_bits > 0:
        raise QuantizationError(f"{method}: average_bits={params.average_bits!r} must be > 0")
    if params.average_bits < min(options):
        raise QuantizationError(
            f"{method}: average_bits={params.average_bits!r} is below the smallest possible size "
            f"{min(options)} (every layer at the lowest of bits_options={sorted(options)})")
    return sorted(set(options))


def layer_setup(quantizer: Quantizer, model: PreTrainedModel, options: Sequence[int]):
    """Targeted Linears, their sizes and ``||Q_b(W) - W||²`` for every option."""
    p = quantizer.params
    linears = dict(quantizer.target_linears(model))
    quant = rtn_quantize(p.granularity, p.group_size, p.symmetric)
    sizes = {name: m.weight.numel() for name, m in linears.items()}
    errors = quantization_errors({name: m.weight for name, m in linears.items()}, options, quant)
    return linears, sizes, errors, quant


def hessian_batch(calibration: torch.Tensor, n: int) -> torch.Tensor:
    return calibration[:min(n, calibration.shape[0])]


def build_mixed_result(model: PreTrainedModel, linears: Mapping[str, torch.nn.Linear],
                       alloc: Mapping[str, int], params, scheme: str, metrics: dict,
                       extra_meta: dict | None = None) -> QuantizedModel:
    """RTN-quantize each targeted Linear at its allocated bits and pack the result."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store = PackedWeights()
    total_bits, total_n = 0, 0
    for module_name, linear in linears.items():
        name = f"{module_name}.weight"
        bits = int(alloc[module_name])
        weight = linear.weight.detach().to(torch.float32)
        codes, scales, zeros, dequant = quantize_tensor(weight, bits, params.granularity, params.group_size,
                                                        params.symmetric, name)
        state[name] = dequant.to(state[name].dtype)
        store.add_int(name, weight.shape, codes, scales, zeros, bits, params.granularity, params.group_size,
                      params.symmetric)
        total_bits += bits * weight.numel()
        total_n += weight.numel()
    metrics = dict(metrics)
    for module_name in linears:
        metrics[f"bits.{module_name}"] = int(alloc[module_name])
    metrics["average_bits"] = total_bits / total_n
    meta = store.meta(scheme, bits=total_bits / total_n, granularity=params.granularity,
                      group_size=params.group_size if params.granularity == "group" else None,
                      symmetric=params.symmetric, mixed_precision=True,
                      bits_options=list(params.bits_options), average_bits_budget=float(params.average_bits),
                      allocation={m: int(alloc[m]) for m in linears}, metrics=metrics, **(extra_meta or {}))
    return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)


@contextmanager
def allocation_applied(linears: Mapping[str, torch.nn.Linear], alloc: Mapping[str, int], quantize: Quantize):
    """Temporarily replace each Linear's weight by its RTN copy at the allocated bits."""
    replacement = {m: quantize(linears[m].weight.detach(), int(b), f"{m}.weight") for m, b in alloc.items()}
    with swapped_weights(linears, replacement):
        yield


def nonnegative(value: float) -> float:
    """Curvature estimates used as sensitivities: a negative estimate (saddle direction or
    estimator noise) would reward coarser grids, so it counts as zero sensitivity."""
    return max(float(value), 0.0)
