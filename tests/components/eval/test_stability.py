"""Stability of a sweep: the loss-spike measure, the unstable share per group, its grid plot, and
the recipe check of a group's runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from components.eval.report_plots import stability_grid
from components.eval.stability import StabilitySpec, claim_values, group_stability, loss_spike
from flows.recipe import RecipeError, load_plan


def test_loss_spike_is_the_largest_relative_rise_of_the_smoothed_loss_after_warmup():
    assert loss_spike([5.0, 4.0, 3.0, 2.0, 1.0], warmup_steps=0, window=2) == 0.0  # it only fell
    # smoothed (window 2): 4.5 3.5 2.5 2 2 2.5 3.5 4.5 5 5; lowest 2, highest after it 5
    assert loss_spike([5, 4, 3, 2, 2, 2, 3, 4, 5, 5, 5], warmup_steps=0, window=2) == pytest.approx(1.5)
    # one noisy batch is smoothed away: 2.0 among ten 1.0s rises the 10-step mean by 10%
    assert loss_spike([1.0] * 10 + [2.0] + [1.0] * 10, warmup_steps=0) == pytest.approx(0.1)
    # a rise that has recovered when warmup ends does not count; one still standing then does
    early = [3.0, 1.0, 3.0, 0.9, 0.8, 0.8]
    assert loss_spike(early, warmup_steps=0, window=1) == pytest.approx(2.0)
    assert loss_spike(early, warmup_steps=3, window=1) == 0.0
    assert loss_spike([3.0, 1.0, 3.0, 2.0, 1.5], warmup_steps=3, window=1) == pytest.approx(1.0)
    assert loss_spike([], warmup_steps=0) == 0.0


def facts(lr: float, spike: float, diverged: bool = False) -> dict:
    return {"stability_lr": lr, "stability_loss_spike": spike, "stability_diverged": float(diverged)}


def test_a_group_counts_diverged_and_spiking_runs_as_unstable(tmp_path):
    per_model = {"a_lo": facts(0.01, 0.05), "a_hi": facts(0.1, 0.5), "b_lo": facts(0.01, 0.0),
                 "b_hi": facts(0.1, 0.0, diverged=True), "c_lo": facts(0.01, 0.2)}
    a = group_stability(StabilitySpec(name="a", models=["a_lo", "a_hi"]), per_model)
    assert (a["runs"], a["unstable"], a["unstable_fraction"], a["diverged_fraction"]) == (2, 1, 0.5, 0.0)
    assert a["mean_loss_spike"] == pytest.approx(0.275)
    assert [d["unstable"] for d in a["runs_detail"].values()] == [False, True]
    b = group_stability(StabilitySpec(name="b", models=["b_lo", "b_hi"]), per_model)
    assert (b["unstable_fraction"], b["diverged_fraction"]) == (0.5, 0.5)
    loose = group_stability(StabilitySpec(name="a", models=["a_lo", "a_hi"], spike_tolerance=1.0), per_model)
    assert loose["unstable_fraction"] == 0.0
    assert set(claim_values(a)) == {"runs", "unstable", "unstable_fraction", "diverged_fraction", "mean_loss_spike"}
    path = stability_grid({"a": a, "b": b}, tmp_path / "grid.png")
    assert path.exists() and path.stat().st_size > 1000
    assert stability_grid({}, tmp_path / "none.png") is None


def test_a_group_refuses_missing_runs_and_runs_without_stability_facts():
    with pytest.raises(ValueError, match=r"models \['x'\] are not among the evaluated models"):
        group_stability(StabilitySpec(name="g", models=["x"]), {})
    with pytest.raises(ValueError, match="'q' has no stability facts"):
        group_stability(StabilitySpec(name="g", models=["q"]), {"q": {"ppl_all": 3.0}})
    with pytest.raises(ValueError, match=r"models\n  List should have at least 1 item"):
        StabilitySpec(name="g", models=[])
    with pytest.raises(ValueError, match=r"spike_tolerance\n  Input should be greater than 0"):
        StabilitySpec(name="g", models=["a"], spike_tolerance=0)


FP8_AND_BACK = Path(__file__).resolve().parents[3] / "params" / "fp8_and_back.yaml"


def _fp8_claims_on(unstable_by_format: dict[str, int]) -> dict[str, str]:
    """The recipe's own stability groups and claim, judged with ``n`` unstable runs per format."""
    from types import SimpleNamespace

    from components.eval.claims import Claim, check_claims
    from components.eval.standard import StandardEvaluation
    from tasks.evaluate import _markdown, _stability_groups

    recipe, plan = load_plan(FP8_AND_BACK)
    evaluate = plan.stages["evaluate"]
    evaluator = StandardEvaluation(StandardEvaluation.Params.model_validate(evaluate.params))
    per_model = {}
    for group in evaluator.params.stability:
        for i, run in enumerate(group.models):
            per_model[run] = facts(0.01, 0.5 if i < unstable_by_format[group.name] else 0.01)
    groups = _stability_groups(SimpleNamespace(plan=SimpleNamespace(name="evaluate")), evaluator, per_model)
    results = check_claims([Claim.model_validate(c) for c in evaluate.options["claims"]],
                           {**per_model, **{n: claim_values(g) for n, g in groups.items()}})
    assert "## Stability e4m1:" in _markdown(plan, {"models": per_model, "claims": results, "stability": groups}, {})
    return {r["name"]: r["verdict"] for r in results}


def test_fp8_and_back_claim_needs_two_more_unstable_runs_and_fp32_in_its_place_fails_it():
    assert _fp8_claims_on({"fp32": 0, "e4m3": 1, "e4m2": 2, "e4m1": 3}) == {"fewer_mantissa_bits_less_stable": "PASS"}
    assert _fp8_claims_on({"fp32": 0, "e4m3": 1, "e4m2": 2, "e4m1": 2}) == {"fewer_mantissa_bits_less_stable": "FAIL"}
    # fp32 as unstable as e4m1: the control clears the bar, so the sweep does not discriminate
    assert _fp8_claims_on({"fp32": 4, "e4m3": 1, "e4m2": 2, "e4m1": 4}) == {
        "fewer_mantissa_bits_less_stable": "NOT DISCRIMINATING"}


def test_the_recipe_refuses_a_stability_group_over_runs_it_does_not_evaluate():
    with pytest.raises(RecipeError, match="'fp32_lr3e3_s0' is not among this stage's inputs.models"):
        load_plan(FP8_AND_BACK, ["stages.evaluate.inputs.models=[e4m3_lr3e3_s0]"])
