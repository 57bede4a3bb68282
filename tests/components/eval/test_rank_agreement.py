"""The Fine Line's rank agreement: Spearman's rho between early and final scores of runs, its
bootstrap interval and permutation null, and the evaluate/recipe checks around it; and the
correlations between two metrics across runs (partial when a third is held fixed) built on it."""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats

from components.eval.rank_agreement import (MetricCorrelationSpec, RankAgreementSpec, agreement_scores,
                                           correlation_scores, rank_agreement)
from components.eval.standard import StandardEvaluation
from flows.recipe import RecipeError, load_plan
from tasks.evaluate import checkpoint_label

FINE_LINE = Path(__file__).resolve().parents[3] / "params" / "fine_line.yaml"
FLATNESS = FINE_LINE.parent / "flatness.yaml"


def test_rho_matches_scipy_with_ties_and_ignores_direction():
    early = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0]
    final = [2.5, 1.5, 1.0, 3.0, 4.0, 6.0]
    r = rank_agreement(early, final, bootstrap=0, permutations=100)
    assert r["spearman"] == pytest.approx(stats.spearmanr(early, final).statistic, abs=1e-12)
    # negating both sides (an accuracy instead of a loss) leaves the agreement unchanged
    flipped = rank_agreement([-x for x in early], [-x for x in final], bootstrap=0, permutations=100)
    assert flipped["spearman"] == pytest.approx(r["spearman"], abs=1e-12)
    assert math.isnan(r["spearman_low"]) and r["bootstrap_dropped"] == 0


def test_permutation_null_matches_the_exact_distribution():
    final = np.array([0.3, 0.1, 0.8, 0.5, 0.2, 0.9, 0.4])
    r = rank_agreement(list(final), list(final), bootstrap=0, permutations=20000, seed=1)
    ranks = stats.rankdata(final)
    exact = np.array([np.corrcoef(np.array(p), ranks)[0, 1] for p in itertools.permutations(ranks)])
    assert r["spearman"] == pytest.approx(1.0)
    assert r["null_q95"] == pytest.approx(float(np.quantile(exact, 0.95)), abs=0.04)
    # rho = 1 is reached by one ordering in 7! = 5040
    assert r["p_value"] < 0.002


def test_agreeing_runs_clear_the_null_and_reversed_runs_do_not():
    rng = np.random.default_rng(0)
    final = rng.normal(size=10)
    close = rank_agreement(list(final + 0.05 * rng.normal(size=10)), list(final), bootstrap=500, seed=0)
    assert close["spearman"] > close["null_q95"] and close["p_value"] < 0.05
    assert close["spearman_low"] <= close["spearman"] <= close["spearman_high"] <= 1.0
    reversed_ = rank_agreement(list(-final), list(final), bootstrap=500, seed=0)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["p_value"] > 0.99
    assert reversed_["spearman"] < reversed_["null_q95"]


def test_seeded_and_reproducible():
    early, final = [1, 2, 3, 5, 4, 6], [1, 3, 2, 4, 6, 5]
    a = rank_agreement(early, final, bootstrap=300, permutations=500, seed=3)
    assert a == rank_agreement(early, final, bootstrap=300, permutations=500, seed=3)
    assert a != rank_agreement(early, final, bootstrap=300, permutations=500, seed=4)


def test_all_tied_early_scores_have_no_rho():
    r = rank_agreement([1.0] * 5, [1, 2, 3, 4, 5], bootstrap=50, permutations=100)
    assert math.isnan(r["spearman"]) and math.isnan(r["p_value"])
    assert r["bootstrap_dropped"] == 50 and math.isnan(r["spearman_low"])


@pytest.mark.parametrize("early, final, message", [
    ([1, 2, 3], [1, 2, 3], "at least 4 runs"),
    ([1, 2, 3, 4], [1, 2, 3], "equal-length"),
    ([1, 2, float("nan"), 4], [1, 2, 3, 4], "not finite"),
])
def test_bad_scores_are_named(early, final, message):
    with pytest.raises(ValueError, match=message):
        rank_agreement(early, final)


def test_scores_come_from_each_run_and_its_checkpoint():
    spec = RankAgreementSpec(name="r", metric="loss_prose", models=["a", "b", "c", "d"], at=0.3)
    per_model = {m: {"loss_prose": float(i)} for i, m in enumerate("abcd")}
    per_model |= {f"{m}_at30": {"loss_prose": 10.0 + i} for i, m in enumerate("dcba")}
    early, final = agreement_scores(spec, per_model, checkpoint_label)
    assert early == [13.0, 12.0, 11.0, 10.0] and final == [0.0, 1.0, 2.0, 3.0]
    del per_model["c_at30"]
    with pytest.raises(ValueError, match="'c_at30'.*keep_checkpoints: \\[0.3\\]"):
        agreement_scores(spec, per_model, checkpoint_label)
    with pytest.raises(ValueError, match="metric 'loss_code' is not a metric of a"):
        agreement_scores(spec.model_copy(update={"metric": "loss_code"}), per_model, checkpoint_label)


def test_evaluator_params_need_checkpoints_and_distinct_names():
    spec = {"name": "r", "metric": "loss_prose", "models": ["a", "b", "c", "d"]}
    with pytest.raises(ValidationError, match="set checkpoints: true"):
        StandardEvaluation.Params.model_validate({"rank_agreements": [spec]})
    with pytest.raises(ValidationError, match="repeated: r"):
        StandardEvaluation.Params.model_validate({"checkpoints": True, "rank_agreements": [spec, spec]})
    with pytest.raises(ValidationError, match="at least 4"):
        StandardEvaluation.Params.model_validate({"checkpoints": True, "rank_agreements": [{**spec, "models": ["a"]}]})


@pytest.mark.parametrize("override, message", [
    ("stages.ft_code_lr1e3.params.keep_checkpoints=[0.5]", "stage ft_code_lr1e3 keeps checkpoints at \\[0.5\\]"),
    ("stages.evaluate.inputs.models=[ft_code_lr1e4, ft_code_lr3e4]",
     "'ft_prose_lr3e5' is not among this stage's inputs.models"),
])
def test_recipe_checks_agreements_before_anything_trains(override, message):
    with pytest.raises(RecipeError, match=message):
        load_plan(FINE_LINE, [override])


def test_a_run_that_varies_with_the_recipe_seeds_cannot_be_ranked(tmp_path):
    text = FINE_LINE.read_text().replace("include: [bases/micro.yaml]", f"include: [{FINE_LINE.parent}/bases/micro.yaml]")
    text = text.replace("seed: 0\nprecision", "seed: 0\nseeds: [0, 1]\nprecision")
    unpinned = tmp_path / "unpinned.yaml"
    unpinned.write_text(text.replace("lr: 0.001, warmup_steps: 5, seed: 0,", "lr: 0.001, warmup_steps: 5,", 1))
    with pytest.raises(RecipeError, match="'ft_prose_lr1e3' depends on the recipe's seeds"):
        load_plan(unpinned)


def _recipe_claims_on(path: Path, per_model: dict, heading: str) -> dict[str, str]:
    """The recipe's own evaluate params and claims, judged on the given scores; its report has
    ``heading``."""
    from types import SimpleNamespace

    from components.eval.claims import Claim, check_claims
    from tasks.evaluate import _markdown, _rank_agreements

    recipe, plan = load_plan(path)
    evaluate = plan.stages["evaluate"]
    evaluator = StandardEvaluation(StandardEvaluation.Params.model_validate(evaluate.params))
    ctx = SimpleNamespace(plan=SimpleNamespace(name="evaluate"))
    agreements = _rank_agreements(ctx, evaluator, per_model)
    results = check_claims([Claim.model_validate(c) for c in evaluate.options["claims"]],
                           {**per_model, **{n: a["result"] for n, a in agreements.items()}})
    report = {"models": per_model, "claims": results, "rank_agreements": agreements}
    assert heading in _markdown(plan, report, {})
    return {r["name"]: r["verdict"] for r in results}


def _fine_line_claims_on(per_model: dict) -> dict[str, str]:
    return _recipe_claims_on(FINE_LINE, per_model,
                             "## Rank correlation ranks_prose: loss_prose at 30% of training vs final")


def test_fine_line_claims_pass_on_agreeing_runs_and_fail_on_unrelated_ones():
    recipe, _ = load_plan(FINE_LINE)
    runs = recipe.stages["evaluate"].inputs["models"]
    rng = np.random.default_rng(0)
    final = {run: {f"loss_{d}": float(v) for d, v in zip(("prose", "code", "arithmetic"), rng.normal(3, 0.3, 3))}
             for run in runs}
    agreeing = {**final, **{checkpoint_label(r, 0.3): {k: v + 0.5 for k, v in m.items()} for r, m in final.items()}}
    assert set(_fine_line_claims_on(agreeing).values()) == {"PASS"}
    # early scores unrelated to the final ones: the same bar fails
    unrelated = {**final, **{checkpoint_label(r, 0.3): {k: float(rng.normal(3, 0.3)) for k in m}
                             for r, m in final.items()}}
    verdicts = _fine_line_claims_on(unrelated)
    assert set(verdicts.values()) == {"FAIL"}, verdicts


def test_partial_spearman_matches_the_textbook_formula():
    rng = np.random.default_rng(2)
    x, y, z = rng.normal(size=(3, 9))
    r_xy, r_xz, r_yz = (stats.spearmanr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    expected = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    r = rank_agreement(list(x), list(y), bootstrap=0, permutations=100, given=list(z))
    assert r["spearman"] == pytest.approx(expected, abs=1e-12)
    assert r["raw_spearman"] == pytest.approx(r_xy, abs=1e-12)
    assert r["given_spread"] == pytest.approx(float(np.ptp(z)))


def test_several_metrics_held_fixed_are_regressed_out_together():
    rng = np.random.default_rng(3)
    x, y, z1, z2 = rng.normal(size=(4, 10))
    ranks = [stats.rankdata(v) for v in (x, y, z1, z2)]
    design = np.column_stack([np.ones(10), ranks[2], ranks[3]])

    def residual(v):
        return v - design @ np.linalg.lstsq(design, v, rcond=None)[0]

    expected = np.corrcoef(residual(ranks[0]), residual(ranks[1]))[0, 1]
    r = rank_agreement(list(x), list(y), bootstrap=0, permutations=100, given=[list(z1), list(z2)])
    assert r["spearman"] == pytest.approx(expected, abs=1e-12)
    assert "given_spread" not in r  # a spread is reported for one metric held fixed only
    spec = MetricCorrelationSpec(name="c", x="a", y="b", given="loss_prose", models=["a", "b", "c", "d"])
    assert spec.given == ["loss_prose"]  # one name is a list of one


def test_holding_the_confounder_fixed_removes_a_correlation_it_alone_causes():
    rng = np.random.default_rng(0)
    loss = rng.normal(size=12)  # both metrics follow the upstream loss, and nothing else
    x, y = loss + 0.05 * rng.normal(size=12), loss + 0.05 * rng.normal(size=12)
    r = rank_agreement(list(x), list(y), bootstrap=0, seed=0, given=list(loss))
    assert r["raw_spearman"] > 0.9 and r["spearman"] < r["null_q95"]
    # a link beyond the confounder survives it
    extra = rng.normal(size=12)
    r = rank_agreement(list(loss + extra), list(loss + extra + 0.05 * rng.normal(size=12)), bootstrap=0, seed=0,
                       given=list(loss))
    assert r["spearman"] > r["null_q95"]


def test_correlation_pairs_models_by_position_and_names_what_is_missing():
    spec = MetricCorrelationSpec(name="c", x="hessian_trace", y="loss_arithmetic", given="loss_prose",
                                 models=["a", "b", "c", "d"], y_models=["pa", "pb", "pc", "pd"])
    per_model = {m: {"hessian_trace": float(i), "loss_prose": 10.0 - i} for i, m in enumerate("abcd")}
    per_model |= {f"p{m}": {"loss_arithmetic": 20.0 + i} for i, m in enumerate("dcba")}
    assert correlation_scores(spec, per_model) == ([0.0, 1.0, 2.0, 3.0], [23.0, 22.0, 21.0, 20.0],
                                                   [[10.0, 9.0, 8.0, 7.0]])
    with pytest.raises(ValueError, match="metric 'loss_prose' is not a metric of b"):
        correlation_scores(spec, {**per_model, "b": {"hessian_trace": 1.0}})
    with pytest.raises(ValueError, match="needs scores of 'pc'"):
        correlation_scores(spec, {k: v for k, v in per_model.items() if k != "pc"})
    with pytest.raises(ValidationError, match="3 y_models for 4 models"):
        MetricCorrelationSpec(name="c", x="a", y="b", models=["a", "b", "c", "d"], y_models=["a", "b", "c"])
    with pytest.raises(ValidationError, match="repeated: c"):
        StandardEvaluation.Params.model_validate({"correlations": [spec.model_dump()] * 2})


def test_recipe_checks_correlations_before_anything_trains():
    with pytest.raises(RecipeError, match=r"correlations\[0\].models: 'probe_b8_lr1e4' is not among this stage's inputs"):
        load_plan(FLATNESS, ["stages.evaluate.inputs.models=[ft_b8_lr1e4, ft_b8_lr3e4, ft_b8_lr1e3, ft_b8_lr2e3, "
                             "ft_b32_lr1e4, ft_b32_lr3e4, ft_b32_lr1e3, ft_b32_lr2e3]"])


def test_flatness_claim_passes_when_flatness_predicts_the_probe_beyond_the_loss_and_fails_otherwise():
    recipe, _ = load_plan(FLATNESS)
    spec = recipe.stages["evaluate"].params["correlations"][0]
    rng = np.random.default_rng(0)
    loss = rng.normal(3.0, 0.02, size=8)
    trace = rng.uniform(50, 150, size=8)
    retained = rng.normal(2.0, 0.1, size=8)  # each prose run's own arithmetic loss (the second correlation)

    def scores(probe_loss):
        per_model = {m: {"hessian_trace": float(t), "loss_prose": float(v), "loss_arithmetic": float(a)}
                     for m, t, v, a in zip(spec["models"], trace, loss, retained)}
        return per_model | {m: {"loss_arithmetic": float(p)} for m, p in zip(spec["y_models"], probe_loss)}

    heading = "## Rank correlation flat_probe: hessian_trace vs loss_arithmetic, holding loss_prose fixed (partial)"
    assert _recipe_claims_on(FLATNESS, scores(2.0 + 0.01 * trace), heading) == {"flatter_models_probe_better": "PASS"}
    unrelated = _recipe_claims_on(FLATNESS, scores(rng.normal(2.0, 0.1, size=8)), heading)
    assert unrelated == {"flatter_models_probe_better": "FAIL"}
