import itertools
import math

import pytest
import torch

from components.model.presets import build_model
from components.quant.base import QuantizationError
from components.quant.sensitivity import (allocate_bits_milp, allocate_bits_pairwise, allocation_cost,
                                          allocation_size, bisect_budget, hutchinson_trace, hutchinson_traces,
                                          loss_fn, make_loss_closure, monotone_allocation, pairwise_loss_terms,
                                          pareto_frontier, rtn_quantize, top_eigenvalue, top_eigenvalues)


class Quadratic(torch.nn.Module):
    """loss = xᵀAx over x = concat(blocks): Hessian 2A, known exactly."""

    def __init__(self, A: torch.Tensor, splits: list[int]):
        super().__init__()
        self.A = A
        self.blocks = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, dtype=A.dtype)) for n in splits)

    def loss(self):
        x = torch.cat(list(self.blocks))
        return x @ self.A @ x


def symmetric(n, seed, eigenvalues=None):
    g = torch.Generator().manual_seed(seed)
    if eigenvalues is None:
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        return (m + m.T) / 2
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def nano():
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=0)


# ------------------------------------------------------------------ Hutchinson trace


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_trace_matches_exact_trace_within_sampling_error(seed):
    A = symmetric(12, seed)
    model = Quadratic(A, [12])
    H = 2 * A
    n = 400
    est = hutchinson_trace(model, [model.blocks[0]], model.loss, n_samples=n, tol=0.0, seed=seed)
    # Rademacher probes: Var(vᵀHv) = 2 Σ_{a≠b} H_ab², so the mean of n probes has this std
    off = H - torch.diag(torch.diag(H))
    std = math.sqrt(2 * float((off ** 2).sum()) / n)
    assert abs(est - float(torch.trace(H))) <= 5 * std
    assert std < 0.3 * float((H ** 2).sum()) ** 0.5  # the bound is not vacuous


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_stops_early():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    model = Quadratic(A, [4])
    traces, used = hutchinson_traces(model, {"x": [model.blocks[0]]}, model.loss, n_samples=100, tol=1e-3)
    assert traces["x"] == pytest.approx(2 * 2.5, abs=1e-12)  # vᵀDv = Tr(D) for every sign vector
    assert used == 2  # running mean unchanged after the second probe


def test_joint_hutchinson_per_block_traces_within_sampling_error():
    A = symmetric(11, 7)
    H = 2 * A
    model = Quadratic(A, [6, 5])
    n = 600
    traces, used = hutchinson_traces(model, {"a": [model.blocks[0]], "b": [model.blocks[1]]}, model.loss,
                                     n_samples=n, tol=0.0, seed=3)
    assert used == n
    for name, idx in (("a", range(0, 6)), ("b", range(6, 11))):
        inside = torch.zeros(11, dtype=torch.bool)
        inside[list(idx)] = True
        block = H[inside][:, inside]
        cross = H[inside][:, ~inside]
        # v_iᵀ(Hv)_i = Tr(H_ii) + 2Σ_{a<b∈i} H_ab v_a v_b + Σ_{a∈i,c∉i} H_ac v_a v_c
        var = 4 * float(torch.triu(block, 1).pow(2).sum()) + float(cross.pow(2).sum())
        assert abs(traces[name] - float(torch.trace(block))) <= 5 * math.sqrt(var / n)


def test_hessian_mode_restores_requires_grad():
    A = symmetric(4, 0)
    model = Quadratic(A, [2, 2])
    model.blocks[1].requires_grad_(False)
    hutchinson_trace(model, [model.blocks[0]], model.loss, n_samples=3)
    assert model.blocks[0].requires_grad and not model.blocks[1].requires_grad


# ------------------------------------------------------------------ power iteration


@pytest.mark.parametrize("eigs", [[10.0, 5.0, 3.0, 1.0, -2.0, 0.5], [-12.0, 5.0, 3.0, 1.0, 2.0, 0.5]])
def test_power_iteration_matches_eigvalsh(eigs):
    A = symmetric(6, 1, eigs)
    model = Quadratic(A, [6])
    evals = torch.linalg.eigvalsh(2 * A)
    expected = float(evals[evals.abs().argmax()])  # largest magnitude, sign kept
    got = top_eigenvalue(model, [model.blocks[0]], model.loss, iters=500, tol=1e-12, seed=0)
    assert got == pytest.approx(expected, rel=1e-6)


def test_power_iteration_per_block_uses_diagonal_blocks_only():
    A = symmetric(8, 4)
    model = Quadratic(A, [5, 3])
    values, iters = top_eigenvalues(model, {"a": [model.blocks[0]], "b": [model.blocks[1]]}, model.loss,
                                    iters=1000, tol=1e-13)
    for name, sl in (("a", slice(0, 5)), ("b", slice(5, 8))):
        evals = torch.linalg.eigvalsh(2 * A[sl, sl])
        assert values[name] == pytest.approx(float(evals[evals.abs().argmax()]), rel=1e-5)
        assert 1 <= iters[name] <= 1000


def test_hessian_of_nano_lm_runs_with_sdpa_model_and_restores_it():
    model = nano()
    before = model.config._attn_implementation
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    w = model.model.layers[1].mlp.down_proj.weight
    trace = hutchinson_trace(model, [w], make_loss_closure(model, ids), n_samples=4)
    lam = top_eigenvalue(model, [w], make_loss_closure(model, ids), iters=30)
    assert math.isfinite(trace) and math.isfinite(lam) and lam != 0.0
    assert model.config._attn_implementation == before
    assert all(p.requires_grad for p in model.parameters())


def test_loss_fn_is_token_weighted_mean_over_batches():
    model = nano()
    ids = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(1))
    whole = loss_fn(model, ids, batch_size=5)
    assert loss_fn(model, ids, batch_size=2) == pytest.approx(whole, rel=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert whole == pytest.approx(float(ref), rel=1e-5)


# ------------------------------------------------------------------ MILP / IQP allocation


def brute(costs, sizes, budget, pairs=None):
    layers = list(costs)
    best = math.inf
    for combo in itertools.product(*[sorted(costs[layer]) for layer in layers]):
        alloc = dict(zip(layers, combo))
        if allocation_size(alloc, sizes) <= budget:
            best = min(best, allocation_cost(alloc, costs, pairs))
    return best


def random_problem(seed, n_layers=6, bits=(2, 4, 8)):
    g = torch.Generator().manual_seed(seed)
    sizes = {f"l{i}": int(torch.randint(10, 200, (1,), generator=g)) for i in range(n_layers)}
    costs = {}
    for layer in sizes:
        s = float(torch.rand(1, generator=g)) * 10
        costs[layer] = {b: s * 4.0 ** (-b / 2) * (1 + 0.1 * float(torch.rand(1, generator=g))) for b in bits}
    return costs, sizes


def test_milp_finds_known_optimum():
    costs = {"a": {2: 10.0, 4: 1.0, 8: 0.0}, "b": {2: 1.0, 4: 0.5, 8: 0.0}, "c": {2: 3.0, 4: 0.2, 8: 0.0}}
    sizes = {"a": 100, "b": 100, "c": 100}
    # budget 4 bits/weight: (4,2,4)=1+1+0.2=2.2 beats (8,2,2)=4 and (4,4,4)=1.7? 1+0.5+0.2 = 1.7 best
    assert allocate_bits_milp(costs, sizes, 1200) == {"a": 4, "b": 4, "c": 4}
    # budget 1000 bits: (4,2,4)=2.2 is optimal ((2,4,4) = 10.7, (4,4,2) = 4.5, (8,2,...) over budget)
    assert allocate_bits_milp(costs, sizes, 1000) == {"a": 4, "b": 2, "c": 4}
    assert allocate_bits_milp(costs, sizes, 2400) == {"a": 8, "b": 8, "c": 8}


@pytest.mark.parametrize("seed", range(6))
def test_milp_matches_brute_force_and_respects_budget(seed):
    costs, sizes = random_problem(seed)
    total = sum(sizes.values())
    for avg in (2.0, 2.7, 3.5, 4.0, 5.2, 8.0):
        budget = avg * total
        alloc = allocate_bits_milp(costs, sizes, budget)
        assert allocation_size(alloc, sizes) <= budget
        assert allocation_cost(alloc, costs) == pytest.approx(brute(costs, sizes, budget), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_milp_matches_exhaustive(seed):
    costs, sizes = random_problem(seed, n_layers=5)
    g = torch.Generator().manual_seed(100 + seed)
    layers = list(costs)
    pairs = {(u, v): {(a, b): float(torch.randn(1, generator=g)) * 0.3 for a in (2, 4, 8) for b in (2, 4, 8)}
             for u, v in itertools.combinations(layers, 2)}
    total = sum(sizes.values())
    for avg in (2.5, 3.3, 4.0, 6.0):
        budget = avg * total
        alloc, obj = allocate_bits_pairwise(costs, pairs, sizes, budget, method="milp")
        ex_alloc, ex_obj = allocate_bits_pairwise(costs, pairs, sizes, budget, method="exhaustive")
        assert allocation_size(alloc, sizes) <= budget
        assert obj == pytest.approx(ex_obj, abs=1e-9)
        assert obj == pytest.approx(brute(costs, sizes, budget, pairs), abs=1e-9)
        assert obj == pytest.approx(allocation_cost(alloc, costs, pairs), abs=1e-12)


def test_pair_terms_change_the_optimum():
    costs = {"a": {2: 1.0, 4: 0.0}, "b": {2: 1.0, 4: 0.0}, "c": {2: 1.1, 4: 0.0}}
    sizes = {"a": 1, "b": 1, "c": 1}
    budget = 2 + 2 + 4  # one layer at 4 bits
    assert allocate_bits_pairwise(costs, {}, sizes, budget)[0] == {"a": 2, "b": 2, "c": 4}
    # a and b at 2 bits together hurt much more than the sum of their parts
    pairs = {("a", "b"): {(2, 2): 5.0}}
    alloc, obj = allocate_bits_pairwise(costs, pairs, sizes, budget)
    assert alloc["c"] == 2 and obj == pytest.approx(2.1)


def test_monotone_allocation_is_the_best_monotone_assignment():
    costs, sizes = random_problem(3, n_layers=7)
    ranking = sorted(costs, key=lambda layer: -costs[layer][2] / sizes[layer])
    total = sum(sizes.values())
    for avg in (2.4, 3.0, 4.0, 5.5):
        budget = avg * total
        alloc = monotone_allocation(ranking, costs, sizes, budget)
        bits = [alloc[layer] for layer in ranking]
        assert bits == sorted(bits, reverse=True)
        assert allocation_size(alloc, sizes) <= budget
        best = math.inf
        for combo in itertools.product((2, 4, 8), repeat=len(ranking)):
            if list(combo) == sorted(combo, reverse=True):
                cand = dict(zip(ranking, combo))
                if allocation_size(cand, sizes) <= budget:
                    best = min(best, allocation_cost(cand, costs))
        assert allocation_cost(alloc, costs) == pytest.approx(best)


def test_allocation_bad_inputs_name_the_value():
    sizes = {"a": 10, "b": 30}
    with pytest.raises(QuantizationError, match=r"bits_options=\[\]"):
        allocate_bits_milp({"a": {}, "b": {4: 1.0}}, sizes, 1000)
    for bad in (1, 9):  # packing stores 1..8 bits, but a symmetric 1-bit RTN grid has no levels
        with pytest.raises(QuantizationError, match=rf"bits={bad}"):
            allocate_bits_milp({"a": {bad: 1.0}, "b": {4: 1.0}}, sizes, 1000)
    assert allocate_bits_milp({"a": {5: 1.0, 3: 2.0}, "b": {4: 1.0}}, sizes, 10 * 5 + 30 * 4) == {"a": 5, "b": 4}
    with pytest.raises(QuantizationError, match=r"budget 60 bits \(1\.5 bits per weight\).*80 bits \(2 bits"):
        allocate_bits_milp({"a": {2: 1.0, 4: 0.0}, "b": {2: 1.0, 4: 0.0}}, sizes, 60)
    with pytest.raises(QuantizationError, match="unknown method 'greedy'"):
        allocate_bits_pairwise({"a": {2: 1.0}}, {}, {"a": 1}, 2, method="greedy")


# ------------------------------------------------------------------ pairwise terms


class Additive(torch.nn.Module):
    """Three Linears on separate inputs; the loss is a sum of per-layer terms."""

    def __init__(self, chain=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l0, self.l1, self.l2 = (torch.nn.Linear(8, 8, bias=False, dtype=torch.float64) for _ in range(3))
        for lin in (self.l0, self.l1, self.l2):
            lin.weight.data = torch.randn(8, 8, generator=g, dtype=torch.float64)
        self.x = torch.randn(3, 16, 8, generator=g, dtype=torch.float64)
        self.y = torch.randn(3, 16, 8, generator=g, dtype=torch.float64)
        self.chain = chain

    def loss(self):
        if self.chain:
            return float(((self.l2(self.l1(self.l0(self.x[0]))) - self.y[0]) ** 2).mean())
        return float(sum(((lin(self.x[k]) - self.y[k]) ** 2).mean() for k, lin in enumerate((self.l0, self.l1,
                                                                                               self.l2))))


def test_pair_terms_vanish_for_an_additive_loss():
    model = Additive()
    terms = pairwise_loss_terms(model, ["l0", "l1", "l2"], [2, 4, 8], loss=model.loss)
    scale = abs(terms.base_loss)
    assert all(abs(terms.single[u][2]) > 1e-3 * scale for u in ("l0", "l1", "l2"))
    assert len(terms.pair) == 3 and all(len(t) == 9 for t in terms.pair.values())
    assert max(abs(v) for t in terms.pair.values() for v in t.values()) <= 1e-12 * scale
    # a composed (non-additive) loss has real cross terms
    chained = Additive(chain=True)
    terms = pairwise_loss_terms(chained, ["l0", "l1", "l2"], [2, 4], loss=chained.loss)
    assert max(abs(v) for t in terms.pair.values() for v in t.values()) > 1e-3 * abs(terms.base_loss)
    # weights are restored afterwards
    fresh = Additive(chain=True)
    assert torch.equal(chained.l0.weight, fresh.l0.weight)


def test_blockwise_pair_terms_match_full_forward():
    model = nano()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    units = {"q0": ["model.layers.0.self_attn.q_proj"], "d0": ["model.layers.0.mlp.down_proj"],
             "up1": ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj"]}
    quant = rtn_quantize("per_channel")
    fast = pairwise_loss_terms(model, units, [2, 4], ids, quantize=quant, batch_size=2)
    slow = pairwise_loss_terms(model, units, [2, 4], quantize=quant, loss=lambda: loss_fn(model, ids, 4))
    assert fast.base_loss == pytest.approx(slow.base_loss, abs=1e-5)
    for u in units:
        for b in (2, 4):
            assert fast.single[u][b] == pytest.approx(slow.single[u][b], abs=2e-5)
    for key, t in slow.pair.items():
        for bb, v in t.items():
            assert fast.pair[key][bb] == pytest.approx(v, abs=2e-5)
    assert max(abs(v) for t in slow.pair.values() for v in t.values()) > 1e-4  # not trivially zero
    # pair_bits restricts the measured pairs
    few = pairwise_loss_terms(model, units, [2, 4, 8], ids, quantize=quant, pair_bits=[2])
    assert all(set(t) == {(2, 2)} for t in few.pair.values())
    assert few.evaluations == 1 + 3 * 3 + 3 * 1


# ------------------------------------------------------------------ Pareto frontier and bisection


def test_pareto_frontier_on_a_toy_set():
    points = [(4, 10.0), (2, 20.0), (3, 15.0), (3, 12.0), (5, 12.0), (6, 3.0), (6, 3.0), (2, 25.0), (7, 3.0)]
    assert pareto_frontier(points) == [(2, 20.0), (3, 12.0), (4, 10.0), (6, 3.0)]
    assert pareto_frontier([(1, 1.0, "x"), (1, 2.0, "y")]) == [(1, 1.0, "x")]
    assert pareto_frontier([]) == []


def test_bisection_finds_smallest_budget_within_bound():
    def solve(budget):
        return {"x": budget}

    def loss_increase(alloc):  # falls as the budget grows
        return 100.0 / alloc["x"]

    alloc, value, trace = bisect_budget(solve, loss_increase, 10.0, 1000.0, max_loss_increase=0.5,
                                        resolution_bits=1.0)
    assert value <= 0.5 and 200.0 <= alloc["x"] <= 201.0
    assert len(trace) <= 2 + math.ceil(math.log2(990))
    with pytest.raises(QuantizationError, match=r"max_loss_increase=0\.01 cannot be met.*0\.1"):
        bisect_budget(solve, loss_increase, 10.0, 1000.0, max_loss_increase=0.01, resolution_bits=1.0)
    alloc, value, _ = bisect_budget(solve, loss_increase, 10.0, 1000.0, max_loss_increase=50.0, resolution_bits=1.0)
    assert alloc["x"] == 10.0
