"""Training-data samplers on their own: RS2 rounds, fixed subsets, the Skill-it update, params,
the recipe's `sampler` stage option and the training task's domain skills."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from components.registry import UnknownMethodError  # noqa: E402
from components.train.samplers.base import SamplerError  # noqa: E402
from components.train.samplers.registry import SAMPLERS  # noqa: E402
from components.train.trainer import BatchOrder  # noqa: E402
from flows.recipe import RecipeError, load_plan  # noqa: E402
from tasks.train import build_sampler, domain_skills  # noqa: E402
from tests.helpers import NANO_RECIPE  # noqa: E402


def make(key: str, n: int, batch: int, seed: int = 0, skills=None, validation=None, **params):
    cls = SAMPLERS.get(key)
    sampler = cls(cls.Params(**params))
    sampler.bind(n, batch, seed, skills, validation)
    return sampler


def stream(sampler, steps: int) -> np.ndarray:
    return np.concatenate([sampler.indices(i) for i in range(steps)])


def test_registry_keys_and_unknown_key():
    assert SAMPLERS.keys() == ["fixed_subset", "rs2", "skill_it", "uniform"]
    with pytest.raises(UnknownMethodError, match="unknown sampler method 'rs3'; registered sampler methods: "
                                                 "fixed_subset, rs2, skill_it, uniform"):
        SAMPLERS.get("rs3")


def test_uniform_is_batch_order_exactly():
    sampler, order = make("uniform", 13, 5, seed=7), BatchOrder(13, 5, 7)
    for step in range(40):
        assert np.array_equal(sampler.indices(step), order.indices(step))
    assert sampler.facts(40) == {} and sampler.state() == {}


def test_rs2_covers_every_block_once_per_round_and_never_repeats_within_it():
    n, batch = 23, 5
    sampler = make("rs2", n, batch, seed=3, fraction=0.25)
    assert (sampler.epoch_blocks, sampler.epochs_per_round) == (6, 4)  # chunks of 6, 6, 6 and the last 5
    seen = stream(sampler, 3 * n // batch + 1)[: 3 * n]  # three rounds; batches straddle rounds
    rounds = seen.reshape(3, n)
    for r in rounds:
        assert sorted(r) == list(range(n))  # every block exactly once per round
    # an epoch is a chunk of one round's shuffle; the next round reshuffles
    first_epochs = [set(rounds[r][:6]) for r in range(3)]
    assert first_epochs[0] != first_epochs[1] != first_epochs[2]
    assert np.array_equal(stream(make("rs2", n, batch, seed=3, fraction=0.25), 10), seen[:50])
    assert not np.array_equal(stream(make("rs2", n, batch, seed=4, fraction=0.25), 10), seen[:50])
    facts = sampler.facts(steps=4)  # 20 of 23 blocks seen
    assert facts["sampler_unique_blocks"] == 20 and facts["sampler_epochs"] == pytest.approx(20 / 6)


def test_rs2_fraction_one_of_ten_covers_data_in_ten_epochs():
    sampler = make("rs2", 100, 10, seed=0, fraction=0.1)
    epochs = stream(sampler, 20).reshape(20, 10)  # one epoch = one step here
    assert all(len(set(e)) == 10 for e in epochs)
    assert sorted(np.concatenate(epochs[:10])) == list(range(100))
    assert sorted(np.concatenate(epochs[10:])) == list(range(100))
    assert sampler.facts(20)["sampler_unique_blocks"] == 100


def test_rs2_with_replacement_draws_independent_subsets():
    sampler = make("rs2", 50, 10, seed=1, fraction=0.2, replacement=True)
    epochs = stream(sampler, 30).reshape(30, 10)
    assert all(len(set(e)) == 10 for e in epochs)
    covered = len(set(epochs[:5].ravel()))
    assert covered < 50  # independent draws overlap, unlike a round without replacement
    assert sampler.facts(5)["sampler_unique_blocks"] == covered


def test_fixed_subset_always_uses_the_same_subset_reshuffled():
    sampler = make("fixed_subset", 40, 4, seed=2, fraction=0.25)
    epochs = stream(sampler, 25).reshape(10, 10)
    subset = set(epochs[0])
    assert len(subset) == 10 and all(set(e) == subset for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    other = make("fixed_subset", 40, 4, seed=3, fraction=0.25)
    assert set(stream(other, 3)[:10]) != subset
    assert sampler.facts(25)["sampler_unique_blocks"] == 10


@pytest.mark.parametrize("key,params,match", [
    ("rs2", {"fraction": 0}, "fraction"),
    ("rs2", {"fraction": 1.5}, "fraction"),
    ("rs2", {"fractoin": 0.1}, "fractoin"),
    ("fixed_subset", {"fraction": -0.1}, "fraction"),
    ("skill_it", {"eta": 0}, "eta"),
    ("skill_it", {"update_steps": 0}, "update_steps"),
    ("skill_it", {"graph": [[1, 0], [0]]}, "square"),
    ("skill_it", {"graph": [[1, -0.5], [0, 1]]}, ">= 0"),
    ("skill_it", {"graph": [[0, 1], [1, 1]]}, "diagonal"),
    ("skill_it", {"graph": [[1, 0], [0, 1]], "off_diagonal": 0.5}, "one of `graph`, `off_diagonal` or `estimate_graph`"),
    ("skill_it", {"estimate_graph": True, "off_diagonal": 0.5}, "one of `graph`, `off_diagonal` or `estimate_graph`"),
    ("skill_it", {"prior": {"a": 0.0}}, "prior"),
])
def test_bad_params_name_the_field(key, params, match):
    with pytest.raises(ValueError, match=match):
        SAMPLERS.get(key).Params(**params)


# -- Skill-it ----------------------------------------------------------------------------------

SKILLS = {"a": (0, 6), "b": (6, 10), "c": (10, 20)}


def skill_validation(seq: int = 4) -> dict[str, np.ndarray]:
    # the first token tells the stub model which skill a validation block belongs to
    return {name: np.full((3, seq), i) for i, name in enumerate(SKILLS)}


class StubModel(torch.nn.Module):
    """Returns a preset validation loss per skill (looked up by the block's first token)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.losses = [1.0, 1.0, 1.0]
        self.modes = []

    def forward(self, input_ids, labels):
        self.modes.append(self.training)
        return SimpleNamespace(loss=torch.tensor(self.losses[int(input_ids[0, 0])]))


def test_skill_it_update_follows_the_reference_formula():
    eta, window = 0.3, 2
    graph = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    sampler = make("skill_it", 20, 4, skills=SKILLS, validation=skill_validation(), eta=eta, update_steps=2,
                   window=window, graph=graph, prior={"a": 1.0, "b": 2.0, "c": 1.0})
    model = StubModel()
    model.train()
    np.testing.assert_allclose(sampler.weights, [0.25, 0.5, 0.25])  # the prior, normalised
    history = []
    for step, losses in [(0, [2.0, 1.0, 3.0]), (1, None), (2, [1.5, 0.5, 2.5]), (3, None), (4, [0.2, 0.4, 2.0])]:
        if losses is not None:
            model.losses = losses
            history.append(np.array(losses))
        if step:
            sampler.indices(step - 1)
        metrics = sampler.observe(step, model, torch.autocast("cpu", enabled=False))
        if losses is None:
            assert metrics == {}
            continue
        assert metrics["sampler_val_loss_c"] == pytest.approx(losses[2])
        if step:
            expected = np.array([1.0, 2.0, 1.0]) * np.exp(eta * np.array(graph) @ np.sum(history[-window:], axis=0))
            # rtol: the losses pass through float32
            np.testing.assert_allclose(sampler.weights, expected / expected.sum(), rtol=1e-6)
            assert metrics["sampler_weight_a"] == pytest.approx(sampler.weights[0])
    assert model.training and not any(model.modes)  # evaluated in eval mode, restored afterwards
    facts = sampler.facts(4)
    assert facts["sampler_updates"] == 2 and facts["sampler_hardest_skill"] == "c"  # highest at the first update
    assert facts["sampler_val_loss_initial_a"] == 2.0 and facts["sampler_val_loss_final_a"] == pytest.approx(0.2)
    assert facts["sampler_hardest_weight_gain"] == pytest.approx(sampler.weights[2] - 0.25)


def test_skill_it_normalize_loss_divides_by_step_zero_loss():
    sampler = make("skill_it", 20, 4, skills=SKILLS, validation=skill_validation(), eta=1.0, update_steps=1,
                   window=1, normalize_loss=True, off_diagonal=0.5)
    model = StubModel()
    autocast = torch.autocast("cpu", enabled=False)
    model.losses = [4.0, 2.0, 1.0]
    sampler.observe(0, model, autocast)
    model.losses = [2.0, 2.0, 1.0]  # a halved, b and c unchanged relative to step 0
    sampler.indices(0)
    sampler.observe(1, model, autocast)
    graph = np.eye(3) + 0.5 * (1 - np.eye(3))
    expected = np.exp(graph @ np.array([0.5, 1.0, 1.0]))
    np.testing.assert_allclose(sampler.weights, expected / expected.sum(), rtol=1e-6)  # losses pass through float32


def test_skill_it_draws_rows_within_skills_without_repeats_and_resumes_from_state():
    sampler = make("skill_it", 20, 8, seed=5, skills=SKILLS, validation=skill_validation())
    model, autocast = StubModel(), torch.autocast("cpu", enabled=False)
    sampler.observe(0, model, autocast)
    rows = []
    for step in range(1, 4):
        rows.append(sampler.indices(step - 1))
        sampler.observe(step, model, autocast)
    rows = np.concatenate(rows)
    for name, (start, stop) in SKILLS.items():
        mine = rows[(rows >= start) & (rows < stop)]
        size = stop - start
        for first in range(0, len(mine), size):  # each skill reshuffles its own blocks per epoch
            chunk = mine[first:first + size]
            assert len(set(chunk)) == len(chunk)
    assert sampler.counts.sum() == 24
    saved = sampler.state()
    twin = make("skill_it", 20, 8, seed=5, skills=SKILLS, validation=skill_validation())
    twin.load_state(saved)
    assert np.array_equal(twin.indices(3), sampler.indices(3))
    with pytest.raises(SamplerError, match="skills"):
        make("skill_it", 20, 8, skills={"a": (0, 10), "z": (10, 20)},
             validation={"a": np.zeros((1, 4)), "z": np.zeros((1, 4))}).load_state(saved)


@pytest.mark.parametrize("kwargs,match", [
    ({"skills": {"a": (0, 20)}, "validation": {"a": np.zeros((2, 4))}}, "at least 2 skills"),
    ({"skills": SKILLS, "validation": {"a": np.zeros((2, 4)), "b": np.zeros((2, 4))}}, "skill 'c' has no validation"),
    ({"skills": {"a": (0, 10), "b": (10, 10), "c": (10, 20)}, "validation": skill_validation()},
     "skill 'b' has no training blocks"),
    ({"skills": {"a": (0, 10), "b": (12, 20)}, "validation": skill_validation()}, "expected it to start at row 10"),
    ({"skills": {"a": (0, 10), "b": (10, 18)}, "validation": skill_validation()}, "cover 18 rows but there are 20"),
    ({"skills": SKILLS, "validation": skill_validation(), "graph": [[1, 0], [0, 1]]}, "graph is 2x2 but there are 3"),
    ({"skills": SKILLS, "validation": skill_validation(), "estimate_graph": True}, "needs the training blocks"),
    ({"skills": SKILLS, "validation": skill_validation(), "prior": {"a": 1.0}}, "prior names"),
])
def test_skill_it_bind_errors(kwargs, match):
    with pytest.raises(SamplerError, match=match):
        make("skill_it", 20, 4, **kwargs)


def test_skill_it_estimates_the_graph_from_each_skills_effect_on_the_others():
    """Skills a and b share one pattern (counting up), c another (counting down): training on a
    must lower b's loss much more than c's, and the estimated graph must say so."""
    from components.model.presets import build_model

    vocab, seq = 32, 16
    rng = np.random.default_rng(0)
    up = lambda n: (rng.integers(0, vocab, (n, 1)) + np.arange(seq)) % vocab  # noqa: E731
    down = lambda n: (rng.integers(0, vocab, (n, 1)) - np.arange(seq)) % vocab  # noqa: E731
    train_blocks = np.concatenate([up(40), up(40), down(40)]).astype(np.int32)
    validation = {"a": up(8).astype(np.int32), "b": up(8).astype(np.int32), "c": down(8).astype(np.int32)}
    skills = {"a": (0, 40), "b": (40, 80), "c": (80, 120)}
    cls = SAMPLERS.get("skill_it")
    sampler = cls(cls.Params(estimate_graph=True, graph_steps=15, graph_lr=5e-3))
    sampler.bind(120, 8, 0, skills, validation, train_blocks=train_blocks)
    model = build_model("nano", vocab_size=vocab, max_seq_len=seq, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampler.observe(0, model, torch.autocast("cpu", enabled=False))
    graph = sampler.graph
    assert sampler.graph_estimated and graph.max() == pytest.approx(1.0) and (graph >= 0).all()
    assert graph[0, 1] > 2 * graph[0, 2] and graph[2, 2] > 2 * graph[2, 0]  # a helps b, not c; c helps itself
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # only copies were trained
    twin = cls(cls.Params(estimate_graph=True))
    twin.bind(120, 8, 0, skills, validation, train_blocks=train_blocks)
    twin.load_state(sampler.state())  # a resume restores the estimate instead of redoing it
    assert np.array_equal(twin.graph, graph) and twin.graph_estimated
    assert sampler.facts(0)["sampler_graph_estimated"] is True


# -- recipe option and training task -------------------------------------------------------------


def _nano_with_sampler(tmp_path, sampler: str, stage: str = "pretrain_dense", extra: str = "") -> object:
    text = NANO_RECIPE.read_text()
    anchor = f"  {stage}:\n"
    assert anchor in text
    path = tmp_path / "r.yaml"
    path.write_text(text.replace(anchor, f"{anchor}    sampler: {sampler}\n{extra}", 1))
    return path


def test_recipe_sampler_option_goes_into_options_only_when_set(tmp_path):
    _, base = load_plan(NANO_RECIPE)
    _, plan = load_plan(_nano_with_sampler(tmp_path, "{method: rs2, params: {fraction: 0.25}}"))
    assert plan.stages["pretrain_dense"].options["sampler"] == {
        "method": "rs2", "params": {"fraction": 0.25, "replacement": False}}
    assert plan.stages["pretrain_dense"].digest != base.stages["pretrain_dense"].digest
    assert all("sampler" not in s.options for n, s in base.stages.items())
    assert plan.stages["pretrain_spdf"].digest == base.stages["pretrain_spdf"].digest
    _, overridden = load_plan(_nano_with_sampler(tmp_path, "{method: rs2, params: {fraction: 0.1}}"),
                              ["stages.pretrain_dense.sampler.params.fraction=0.5"])
    assert overridden.stages["pretrain_dense"].options["sampler"]["params"]["fraction"] == 0.5


@pytest.mark.parametrize("sampler,stage,match", [
    ("{method: rs3}", "pretrain_dense",
     r"stages\.pretrain_dense\.sampler\.method: unknown sampler method 'rs3'; registered sampler methods: "
     r"fixed_subset, rs2, skill_it, uniform"),
    ("{method: rs2, params: {fraction: 2}}", "pretrain_dense",
     r"stages\.pretrain_dense\.sampler\.params\.fraction: .*less than or equal to 1.*\(sampler rs2\)"),
    ("{method: skill_it, params: {etaa: 1}}", "pretrain_dense",
     r"stages\.pretrain_dense\.sampler\.params\.etaa: unknown key \(sampler skill_it\)"),
    ("{method: skill_it}", "finetune_prose",
     r"stages\.finetune_prose\.sampler: sampler skill_it mixes domains, so it cannot be combined with "
     r"train_domain 'prose'"),
    ("{method: rs2}", "quantize", r"stages\.quantize\.sampler: a sampler only applies to training stages"),
    ("{methd: rs2}", "pretrain_dense", r"sampler\.methd: unknown key"),
])
def test_recipe_sampler_errors(tmp_path, sampler, stage, match):
    with pytest.raises(RecipeError, match=match):
        load_plan(_nano_with_sampler(tmp_path, sampler, stage))


def _tokens_dir(tmp_path, lengths: dict[str, int], val: dict[str, int], seq: int = 4):
    train = []
    for domain, n in sorted(lengths.items()):
        blocks = np.full((n, seq), len(train), np.int32)
        np.save(tmp_path / f"train-{domain}.npy", blocks)
        np.save(tmp_path / f"validation-{domain}.npy", np.full((val.get(domain, 0), seq), 1, np.int32))
        train.append(blocks)
    np.save(tmp_path / "train.npy", np.concatenate(train))
    return tmp_path


def _blocks(n: int) -> np.ndarray:
    return np.zeros((n, 4), np.int32)


def test_domain_skills_follow_the_sorted_concatenation(tmp_path):
    tokens = _tokens_dir(tmp_path, {"prose": 5, "code": 3, "empty": 0, "arith": 2}, {"prose": 2, "code": 1, "arith": 1})
    ranges, validation = domain_skills(tokens, 10, "pre")
    assert ranges == {"arith": (0, 2), "code": (2, 5), "prose": (5, 10)}  # "empty" has no blocks to draw
    assert {k: len(v) for k, v in validation.items()} == {"arith": 1, "code": 1, "prose": 2}
    with pytest.raises(ValueError, match=r"stage pre: .* hold 10 blocks .* but train\.npy holds 11"):
        domain_skills(tokens, 11, "pre")
    sampler = build_sampler({"sampler": {"method": "skill_it", "params": {}}, "train_domain": None}, tokens,
                            _blocks(10), 4, 0, "pre")
    assert sampler.skills == ["arith", "code", "prose"] and sampler.batch_size == 4
    assert build_sampler({"train_domain": None}, tokens, _blocks(10), 4, 0, "pre") is None
    rs2 = build_sampler({"sampler": {"method": "rs2", "params": {"fraction": 0.5}}, "train_domain": "prose"},
                        tokens, _blocks(5), 2, 0, "pre")
    assert rs2.n_blocks == 5 and rs2.epoch_blocks == 2


def test_build_sampler_errors_name_the_stage(tmp_path):
    tokens = _tokens_dir(tmp_path, {"prose": 5, "code": 3}, {"prose": 2})
    with pytest.raises(ValueError, match="stage pre: sampler 'skill_it' mixes domains, so it cannot be combined "
                                         "with train_domain 'prose'"):
        build_sampler({"sampler": {"method": "skill_it"}, "train_domain": "prose"}, tokens, _blocks(5), 2, 0, "pre")
    with pytest.raises(SamplerError, match="stage pre: sampler 'skill_it': skill 'code' has no validation blocks"):
        build_sampler({"sampler": {"method": "skill_it"}}, tokens, _blocks(8), 2, 0, "pre")
    (tmp_path / "one").mkdir()
    one = _tokens_dir(tmp_path / "one", {"prose": 4}, {"prose": 2})
    with pytest.raises(SamplerError, match=r"needs at least 2 skills \(domains\) to mix, got \['prose'\]"):
        build_sampler({"sampler": {"method": "skill_it"}}, one, _blocks(4), 2, 0, "pre")
