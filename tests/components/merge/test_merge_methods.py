import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.merge.base import MergeError
from components.merge.compeft import ComPEFT, compress_task_vector, compressed_nbytes
from components.merge.dare import DareLinear, DareTies
from components.merge.generalized_task_arithmetic import dare_drop, dare_generator
from components.merge.greedy_soup import GreedySoup
from components.merge.groupwise import GroupwiseMerge, agglomerate, task_vector_cosine
from components.merge.registry import MERGERS
from components.merge.task_arithmetic import TaskArithmetic
from components.merge.ties import Ties
from components.model.presets import build_model


def make(cls, **params):
    return cls(cls.Params(**params))


def nano_sd(seed):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed).state_dict()


def perturbed(sd, seed, scale=0.01):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}


def vec(values, step=0):
    return {"w": torch.tensor(values, dtype=torch.float64), "step": torch.tensor([step])}


def test_registry_papers():
    assert MERGERS.get("ties").paper.arxiv == "2306.01708"
    assert MERGERS.get("dare_linear").paper.arxiv == MERGERS.get("dare_ties").paper.arxiv == "2311.03099"
    assert MERGERS.get("greedy_soup").paper.arxiv == "2203.05482"
    assert MERGERS.get("compeft").paper.arxiv == "2311.13171"
    assert MERGERS.get("groupwise").paper.title.startswith("Asymmetric Conflict and Synergy")
    assert (Ties.sparsification, Ties.sign_consensus) == ("magnitude", True)
    assert (DareLinear.sparsification, DareLinear.sign_consensus) == ("random_dare", False)
    assert (DareTies.sparsification, DareTies.sign_consensus) == ("random_dare", True)


# ---- TIES -------------------------------------------------------------------------------------------

BASE = vec([1.0, 1.0, 1.0, 1.0], step=5)
# task vectors: a=[4,-1,2,-3] -> top-2 [4,0,0,-3]; b=[-2,3,1,-5] -> [0,3,0,-5]; c=[1,-6,2,.5] -> [0,-6,2,0]
A, B, C = (vec([1 + t for t in tau], step=s) for tau, s in
           (([4, -1, 2, -3], 1), ([-2, 3, 1, -5], 2), ([1, -6, 2, 0.5], 3)))


def test_ties_golden():
    merged = make(Ties, density=0.5).merge(BASE, [A, B, C], ["a", "b", "c"])
    # elected signs of [4,-3,2,-8]: + - + -; disjoint means: 4, -6, 2, (-3-5)/2
    assert torch.equal(merged["w"], torch.tensor([5.0, -5.0, 3.0, -3.0], dtype=torch.float64))
    assert merged["step"].tolist() == [5]
    half = make(Ties, density=0.5, scaling=0.5).merge(BASE, [A, B, C], ["a", "b", "c"])
    assert torch.equal(half["w"], torch.tensor([3.0, -2.0, 2.0, -1.0], dtype=torch.float64))
    summed = make(Ties, density=0.5, normalize=False).merge(BASE, [A, B, C], ["a", "b", "c"])
    assert torch.equal(summed["w"], torch.tensor([5.0, -5.0, 3.0, -7.0], dtype=torch.float64))


def test_ties_weighted_golden_and_zero_sum_elects_plus():
    merged = make(Ties, density=0.5, weights=[1.0, 2.0, 1.0]).merge(BASE, [A, B, C], ["a", "b", "c"])
    # weighted trimmed: a=[4,0,0,-3], b=[0,6,0,-10], c=[0,-6,2,0]; sums [4,0,2,-13] -> + + + -
    # entry 1: only b (weight 2) agrees -> 6/2; entry 3: (-3-10)/(1+2)
    expected = torch.tensor([5.0, 4.0, 3.0, 1 - 13 / 3], dtype=torch.float64)
    torch.testing.assert_close(merged["w"], expected, rtol=0, atol=1e-15)


def test_ties_per_model_density_and_one_model_density_one_is_that_model():
    merged = make(Ties, density=[1.0, 0.25, 0.25]).merge(BASE, [A, B, C], ["a", "b", "c"])
    # a untrimmed [4,-1,2,-3]; b -> [0,0,0,-5]; c -> [0,-6,0,0]; sums [4,-7,2,-8]
    assert torch.equal(merged["w"], torch.tensor([5.0, -2.5, 3.0, -3.0], dtype=torch.float64))
    base, tuned = nano_sd(0), nano_sd(1)
    single = make(Ties, density=1.0).merge(base, [tuned], ["tuned"])
    for key in base:
        assert torch.equal(single[key], tuned[key]), key


def test_ties_nano_keeps_dtypes_and_is_between_base_and_models():
    base = nano_sd(0)
    models = [perturbed(base, s) for s in (1, 2)]
    merged = make(Ties, density=0.3).merge(base, models, ["m1", "m2"])
    key = "model.layers.1.self_attn.q_proj.weight"
    assert merged[key].dtype == base[key].dtype and merged[key].shape == base[key].shape
    changed = (merged[key] != base[key]).double().mean().item()
    assert 0.3 <= changed <= 0.6  # each model keeps 30% of entries; the union of two such sets
    for name, value in merged.items():  # a disjoint mean of kept deltas, or none: never outside them
        stacked = torch.stack([base[name]] + [m[name] for m in models])
        assert bool(((value >= stacked.min(0).values) & (value <= stacked.max(0).values)).all()), name


# ---- DARE -------------------------------------------------------------------------------------------

def test_dare_kept_entries_are_exactly_rescaled():
    gen = torch.Generator().manual_seed(0)
    base = vec(torch.randn(400, generator=gen).tolist())
    tuned = vec((base["w"] + torch.randn(400, generator=gen)).tolist())
    tau = tuned["w"] - base["w"]
    merged = make(DareLinear, density=0.25, seed=3).merge(base, [tuned], ["t"])
    delta = merged["w"] - base["w"]
    kept = delta != 0
    assert 60 <= kept.sum().item() <= 140  # ~ Binomial(400, 0.25)
    assert torch.equal(merged["w"][kept], base["w"][kept] + tau[kept] / 0.25)
    assert torch.equal(merged["w"][~kept], base["w"][~kept])


def test_dare_is_unbiased_over_seeds():
    tau = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64)
    density, n_seeds = 0.3, 3000
    mean = sum(dare_drop(tau, density, dare_generator(s, 0, "w")) for s in range(n_seeds)) / n_seeds
    sigma = tau.abs() * math.sqrt((1 - density) / density) / math.sqrt(n_seeds)
    assert torch.all((mean - tau).abs() <= 5 * sigma + 1e-12)


def test_dare_density_one_is_task_arithmetic_bit_for_bit():
    base = nano_sd(0)
    models = [perturbed(base, s) for s in (1, 2)]
    ref = make(TaskArithmetic, scaling=0.7, weights=[0.6, 0.4]).merge(base, models, ["a", "b"])
    dare = make(DareLinear, density=1.0, scaling=0.7, weights=[0.6, 0.4]).merge(base, models, ["a", "b"])
    ties = make(Ties, density=1.0).merge(base, models, ["a", "b"])
    dare_ties = make(DareTies, density=1.0).merge(base, models, ["a", "b"])
    for key in base:
        assert torch.equal(dare[key], ref[key]), key
        assert torch.equal(dare_ties[key], ties[key]), key


def test_dare_is_deterministic_and_independent_of_tensor_order():
    base = nano_sd(0)
    models = [perturbed(base, s) for s in (1, 2)]
    first = make(DareTies, density=0.5, seed=7).merge(base, models, ["a", "b"])
    again = make(DareTies, density=0.5, seed=7).merge(base, models, ["a", "b"])
    rev = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    reordered = make(DareTies, density=0.5, seed=7).merge(rev(base), [rev(m) for m in models], ["a", "b"])
    other = make(DareTies, density=0.5, seed=8).merge(base, models, ["a", "b"])
    key = "model.layers.0.mlp.down_proj.weight"
    for k in base:
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], reordered[k]), k
    assert not torch.equal(first[key], other[key])


# ---- greedy soup ------------------------------------------------------------------------------------

def sq_dist_to(target):
    return lambda sd: float(((sd["w"] - target) ** 2).sum())


def test_greedy_soup_best_first_and_rejects_harmful_ingredient():
    a, b, c = vec([1.0, 0.0]), vec([-1.0, 0.2]), vec([5.0, 5.0])
    merger = make(GreedySoup)
    score = sq_dist_to(torch.zeros(2, dtype=torch.float64))
    merged = merger.merge(None, [c, b, a], ["c", "b", "a"], score_fn=score)
    assert merger.report["tried_in_order"] == ["a", "b", "c"]
    assert merger.report["kept"] == ["a", "b"]
    torch.testing.assert_close(merged["w"], torch.tensor([0.0, 0.1], dtype=torch.float64), rtol=0, atol=1e-15)
    assert merger.report["soup_score"] == pytest.approx(0.01)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_soup_never_worse_than_best_ingredient(seed):
    gen = torch.Generator().manual_seed(seed)
    models = [vec(torch.randn(6, generator=gen).tolist()) for _ in range(5)]
    target = torch.randn(6, generator=gen, dtype=torch.float64)
    score = sq_dist_to(target)
    merger = make(GreedySoup)
    merged = merger.merge(None, models, [f"m{i}" for i in range(5)], score_fn=score)
    assert score(merged) == merger.report["soup_score"] <= min(score(m) for m in models)
    individual = merger.report["individual_scores"]
    assert merger.report["kept"][0] == min(individual, key=individual.get)


def test_greedy_soup_needs_a_score_function():
    with pytest.raises(MergeError, match="greedy_soup: needs a held-out score function"):
        make(GreedySoup).merge(None, [vec([1.0]), vec([2.0])], ["a", "b"])
    with pytest.raises(MergeError, match="NaN for 'b'|NaN for b"):
        make(GreedySoup).merge(None, [vec([1.0]), vec([2.0])], ["a", "b"],
                               score_fn=lambda sd: float("nan") if sd["w"].item() == 2.0 else 0.0)


# ---- ComPEFT ----------------------------------------------------------------------------------------

def test_compeft_density_one_reproduces_balanced_ternary_task_vector():
    # tau entries are +-0.5 with balanced signs: population std = 0.5, so sign * 1.0 * std == tau
    base = vec([1.0, 2.0, 3.0, 4.0], step=9)
    tuned = vec([1.5, 1.5, 3.5, 3.5])
    merger = make(ComPEFT, density=1.0, alpha=1.0)
    merged = merger.merge(base, [tuned], ["t"])
    assert torch.equal(merged["w"], tuned["w"]) and merged["step"].tolist() == [9]
    # 4 entries: bitmask 1 byte < 4 uint8 indices; 4 sign bits -> 1 byte; float32 scale 4
    assert merger.report["compressed_bytes"] == 1 + 1 + 4
    assert merger.report["dense_bytes"] == 4 * 8


def test_compeft_ternary_structure_and_byte_counts():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(1000, generator=gen, dtype=torch.float64)
    code = compress_task_vector(tau, density=0.1, alpha=2.0)
    dense = code.decompress()
    trimmed = torch.zeros_like(tau)
    keep = torch.argsort(tau.abs(), descending=True)[:100]
    trimmed[keep] = tau[keep]
    scale = float(np.float32(2.0 * trimmed.std(correction=0).item()))  # the std of the trimmed vector
    assert scale < 2.0 * tau.std(correction=0).item()  # the untrimmed std was ~1.3x too large here
    assert set(dense.abs().unique().tolist()) == {0.0, scale}
    top = torch.argsort(tau.abs(), descending=True)[:100]
    assert torch.equal(torch.sort(top).values, torch.nonzero(dense).flatten())
    assert torch.equal(torch.sign(dense[top]), torch.sign(tau[top]))
    # k=100 of n=1000: bitmask 125 B < 100 uint16 indices (200 B); sign bits ceil(100/8)=13; scale 4
    assert code.encoding == "bitmask" and compressed_nbytes(code) == code.nbytes == 125 + 13 + 4
    sparse = compress_task_vector(tau, density=0.01)
    # k=10: 10 uint16 indices (20 B) < bitmask 125 B; sign bits 2; scale 4
    assert sparse.encoding == "indices" and sparse.nbytes == 20 + 2 + 4
    back = sparse.decompress()
    assert torch.count_nonzero(back) == 10 and torch.equal(torch.sign(back[back != 0]), torch.sign(tau[back != 0]))


def test_compeft_merge_matches_per_tensor_codes_on_nano():
    base = nano_sd(0)
    models = [perturbed(base, s) for s in (1, 2)]
    merger = make(ComPEFT, density=0.05, alpha=1.5, scaling=0.5)
    merged = merger.merge(base, models, ["a", "b"])
    key = "model.layers.0.mlp.up_proj.weight"
    expected = base[key].double() + 0.5 * sum(
        compress_task_vector(m[key].double() - base[key].double(), 0.05, 1.5).decompress() for m in models)
    torch.testing.assert_close(merged[key], expected.float(), rtol=0, atol=1e-6)
    assert merger.report["alpha"] == 1.5 and "alpha_scores" not in merger.report  # no held-out score: fixed
    total = sum(compress_task_vector(m[k].double() - base[k].double(), 0.05, 1.5).nbytes
                for m in models for k in base if base[k].is_floating_point())
    assert merger.report["compressed_bytes"] == total < merger.report["dense_bytes"] / 10


def test_compeft_tunes_alpha_on_the_held_out_score():
    base = vec([0.0] * 8)
    tuned = vec([0.4, -0.4, 0.3, -0.3, 0.02, -0.02, 0.01, 0.0])
    target = vec([1.2, -1.2, 0.9, -0.9, 0.0, 0.0, 0.0, 0.0])
    merger = make(ComPEFT, density=0.5, alpha_grid=[0.5, 1.0, 2.0, 4.0])
    merged = merger.merge(base, [tuned], ["t"], score_fn=lambda sd: float((sd["w"] - target["w"]).pow(2).sum()))
    scores = merger.report["alpha_scores"]
    assert merger.report["alpha"] == min(scores, key=scores.get) and set(scores) == {0.5, 1.0, 2.0, 4.0}
    code = compress_task_vector(tuned["w"] - base["w"], 0.5, merger.report["alpha"])
    torch.testing.assert_close(merged["w"], code.decompress().to(merged["w"].dtype))


# ---- group-wise -------------------------------------------------------------------------------------

def two_family_models():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=gen, dtype=torch.float64), "step": torch.tensor([0])}
    v1 = torch.zeros(64, dtype=torch.float64)
    v1[:32] = 1.0
    v2 = torch.zeros(64, dtype=torch.float64)
    v2[32:] = 1.0
    models = [{"w": base["w"] + v + 0.1 * torch.randn(64, generator=gen, dtype=torch.float64),
               "step": torch.tensor([0])} for v in (v1, v2, v1, v2)]
    return base, models, ["fr1", "de1", "fr2", "de2"]


def test_groupwise_clusters_two_distinct_families():
    base, models, names = two_family_models()
    sim = task_vector_cosine(base, models)
    assert sim[0, 2] > 0.9 and abs(sim[0, 1]) < 0.2
    assert agglomerate(sim, None, 0.5) == [[0, 2], [1, 3]] == agglomerate(sim, 2, None)
    assert agglomerate(sim, 1, None) == [[0, 1, 2, 3]]
    merger = make(GroupwiseMerge, grouping="cosine", threshold=0.5, within="task_arithmetic")
    merged = merger.merge(base, models, names)
    assert merger.report["groups"] == [["fr1", "fr2"], ["de1", "de2"]]
    taus = [m["w"] - base["w"] for m in models]
    expected = base["w"] + ((taus[0] + taus[2]) + (taus[1] + taus[3])) / 2
    torch.testing.assert_close(merged["w"], expected, rtol=0, atol=1e-12)
    ties = make(GroupwiseMerge, grouping="cosine", n_groups=2, density=1.0)
    merged_ties = ties.merge(base, models, names)
    assert ties.report["groups"] == merger.report["groups"]
    assert merged_ties["w"].shape == base["w"].shape


def test_groupwise_groups_by_measured_synergy_and_keeps_conflicts_apart():
    from components.merge.groupwise import transfer_matrix

    base, models, names = two_family_models()
    # prose fine-tunes help each other's domain; code helps itself only; prose and code hurt each other
    base_losses = {"prose": 4.0, "code": 4.0}
    losses = [{"prose": 3.0, "code": 4.2}, {"prose": 4.3, "code": 3.0}, {"prose": 3.2, "code": 4.1},
              {"prose": 4.2, "code": 3.1}]
    domains = ["prose", "code", "prose", "code"]
    transfer = transfer_matrix(base_losses, losses, domains)
    assert transfer[2, 0] == pytest.approx(0.8) and transfer[1, 0] == pytest.approx(-0.3)  # asymmetric shares
    # a fine-tune that did not improve its own domain: the others' change there, relative to the
    # base's loss, still shows who hurts it
    stalled = [dict(losses[0], code=4.1), losses[1], losses[2], dict(losses[3], code=4.1)]
    flat = transfer_matrix(base_losses, stalled, ["prose", "code", "prose", "code"])
    assert flat[0, 3] == pytest.approx((4.0 - 4.1) / 4.0) and flat[1, 3] == pytest.approx((4.0 - 3.0) / 4.0)
    merger = make(GroupwiseMerge, within="task_arithmetic")
    with pytest.raises(MergeError, match="needs measured losses"):
        merger.merge(base, models, names)
    merger.measure(base_losses, losses, domains)
    merger.merge(base, models, names)
    assert merger.needs_domain_losses and merger.report["groups"] == [["fr1", "fr2"], ["de1", "de2"]]
    assert merger.report["domains"] == domains and merger.report["grouping"] == "transfer"


def test_groupwise_params():
    with pytest.raises(ValidationError, match="either n_groups or threshold"):
        GroupwiseMerge.Params(n_groups=2, threshold=0.3)
    with pytest.raises(MergeError, match="needs the base"):
        make(GroupwiseMerge).merge(None, [vec([1.0])], ["x"])


# ---- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Ties, DareLinear, DareTies, ComPEFT, GroupwiseMerge])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(cls, density):
    with pytest.raises(ValidationError, match=r"density\n.*density must be in \(0, 1\]"):
        cls.Params(density=density)


def test_per_model_density_and_weight_errors():
    with pytest.raises(ValidationError, match="density"):
        Ties.Params(density=[0.5, 0.0])
    with pytest.raises(MergeError, match=r"ties: got 2 density values .* for 3 models"):
        make(Ties, density=[0.5, 0.5]).merge(BASE, [A, B, C], ["a", "b", "c"])
    with pytest.raises(MergeError, match=r"every weight must be > 0; got 'b': -1.0"):
        make(Ties, weights=[1.0, -1.0, 1.0]).merge(BASE, [A, B, C], ["a", "b", "c"])
    with pytest.raises(MergeError, match="weights sum to 0"):
        make(DareLinear, weights=[1.0, -1.0], normalize=True).merge(BASE, [A, B], ["a", "b"])
    with pytest.raises(MergeError, match=r"3 weights .* for 2 models"):
        make(ComPEFT, weights=[1.0, 1.0, 1.0]).merge(BASE, [A, B], ["a", "b"])


@pytest.mark.parametrize("cls", [Ties, DareLinear, DareTies, ComPEFT])
def test_base_required_and_shapes_checked(cls):
    with pytest.raises(MergeError, match=f"{cls.key}: needs the base"):
        make(cls).merge(None, [A, B], ["a", "b"])
    with pytest.raises(MergeError, match=r"checkpoint 'b': tensor 'w' has shape \(3,\)"):
        make(cls).merge(BASE, [A, vec([1.0, 2.0, 3.0])], ["a", "b"])


# ---- grafting ---------------------------------------------------------------------------------------

def test_grafting_keeps_exactly_its_density_and_learning_lowers_the_task_loss():
    from components.merge.grafting import Grafting
    from components.model.presets import build_model

    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64, max_seq_len=16, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    starts = np.random.default_rng(0).integers(0, 64, (64, 1))
    blocks = ((starts + np.arange(16)) % 64).astype(np.int32)  # a learnable counting task
    tuned = build_model("nano", vocab_size=64, max_seq_len=16, seed=0)
    opt = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    for _ in range(30):  # the "fine-tune"
        x = torch.from_numpy(blocks[:16].astype(np.int64))
        loss = tuned(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ft = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    n_float = sum(v.numel() for v in base.values() if v.is_floating_point())

    magnitude = make(Grafting, density=0.05, steps=0)
    graft0 = magnitude.merge(base, [ft], ["ft"])
    assert magnitude.report["grafted_params"] == int(0.05 * n_float)
    changed = sum(int((graft0[k] != base[k]).sum()) for k in base if base[k].is_floating_point())
    assert changed <= int(0.05 * n_float)
    whole = make(Grafting, density=1.0, steps=0).merge(base, [ft], ["ft"])
    assert all(torch.allclose(whole[k], ft[k], atol=1e-6) for k in ft)  # grafting everything is the fine-tune

    learned = make(Grafting, density=0.05, steps=40, lr=0.5)
    learned.use_training(model, blocks)
    graft = learned.merge(base, [ft], ["ft"])
    assert learned.report["grafted_params"] == int(0.05 * n_float)
    assert learned.report["mask_loss_last"] < learned.report["mask_loss_first"]
    assert all(torch.equal(model.state_dict()[k], base[k]) for k in base)  # the model's own weights untouched
    with pytest.raises(MergeError, match="needs the model and the fine-tune's training blocks"):
        make(Grafting, steps=5).merge(base, [ft], ["ft"])
    with pytest.raises(MergeError, match="grafts one fine-tune"):
        make(Grafting, steps=0).merge(base, [ft, ft], ["a", "b"])
    assert graft.keys() == base.keys()
