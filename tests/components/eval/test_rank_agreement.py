"""The Fine Line's rank agreement: Spearman's rho between early and final scores of runs, its
bootstrap interval and permutation null, and the evaluate/recipe checks around it."""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats

from components.eval.rank_agreement import RankAgreementSpec, agreement_scores, rank_agreement
from components.eval.standard import StandardEvaluation
from flows.recipe import RecipeError, load_plan
from tasks.evaluate import checkpoint_label

FINE_LINE = Path(__file__).resolve().parents[3] / "params" / "fine_line.yaml"


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


def _fine_line_claims_on(per_model: dict) -> dict[str, str]:
    """The fine_line recipe's own evaluate params and claims, judged on the given scores."""
    from types import SimpleNamespace

    from components.eval.claims import Claim, check_claims
    from tasks.evaluate import _markdown, _rank_agreements

    recipe, plan = load_plan(FINE_LINE)
    evaluate = plan.stages["evaluate"]
    evaluator = StandardEvaluation(StandardEvaluation.Params.model_validate(evaluate.params))
    ctx = SimpleNamespace(plan=SimpleNamespace(name="evaluate"))
    agreements = _rank_agreements(ctx, evaluator, per_model)
    results = check_claims([Claim.model_validate(c) for c in evaluate.options["claims"]],
                           {**per_model, **{n: a["result"] for n, a in agreements.items()}})
    report = {"models": per_model, "claims": results, "rank_agreements": agreements}
    assert "## Rank agreement ranks_prose: loss_prose at 30% of training vs final" in _markdown(plan, report, {})
    return {r["name"]: r["verdict"] for r in results}


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
