"""The shared scaling-law fitter recovers known exponents from synthetic data, its bootstrap
intervals cover them under noise, and points that cannot determine a law are refused by name."""
from __future__ import annotations

import numpy as np
import pytest

from components.eval.scaling_fit import ScalingFitError, fit_scaling_law

N = np.repeat([1e6, 3e6, 1e7, 3e7, 1e8], 4)
D = np.tile([1e8, 1e9, 1e10, 1e11], 5)
TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}  # Chinchilla's own fit


def chinchilla(n, d):
    return TRUE["E"] + TRUE["A"] * n ** -TRUE["alpha"] + TRUE["B"] * d ** -TRUE["beta"]


def test_exact_points_give_the_law_back():
    fit = fit_scaling_law("chinchilla", {"N": N, "D": D}, chinchilla(N, D), bootstrap=5)
    for name, value in TRUE.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4), name
    assert fit.rmse_log < 1e-6 and fit.n_points == 20
    x = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    power = fit_scaling_law("power", {"x": x}, 2.0 + 50.0 * x ** -0.5, bootstrap=5)
    assert power.params == pytest.approx({"E": 2.0, "A": 50.0, "alpha": 0.5}, rel=1e-4)


def test_bootstrap_intervals_cover_the_true_exponents_under_noise():
    rng = np.random.default_rng(0)
    noisy = chinchilla(N, D) * np.exp(rng.normal(0.0, 0.01, N.size))  # 1% multiplicative noise
    fit = fit_scaling_law("chinchilla", {"N": N, "D": D}, noisy, bootstrap=20, seed=0)
    for name in ("alpha", "beta"):
        low, high = fit.intervals[name]
        assert low < TRUE[name] < high, (name, low, high)
        assert high - low < 0.2, name  # informative, not the whole axis
    assert fit.rmse_log == pytest.approx(0.01, rel=0.5)  # the residuals are the noise
    assert len(fit.log_residuals) == N.size and fit.failed_refits == 0


@pytest.mark.parametrize("law, x, y, message", [
    ("power", {"x": [1.0, 2.0, 3.0]}, [3.0, 2.0, 1.5], "3 points cannot fit the 3 parameters of the power law"),
    ("chinchilla", {"N": [1.0, 2.0]}, [3.0, 2.0], r"needs the variables \['N', 'D'\], got \['N'\]"),
    ("power", {"x": [1.0, 2.0, 0.0, 4.0]}, [3.0, 2.0, 1.5, 1.2], "positive variables and losses"),
    ("power", {"x": [1.0, 2.0, 3.0, 4.0]}, [3.0, float("nan"), 1.5, 1.2], "nan or inf"),
    ("cubic", {"x": [1.0]}, [1.0], "unknown law 'cubic'; known laws: chinchilla, constant, fp_format, power"),
])
def test_points_that_cannot_determine_the_law_are_refused(law, x, y, message):
    with pytest.raises(ScalingFitError, match=rf"^fit journey: .*{message}"):
        fit_scaling_law(law, x, y, where="fit journey")


def test_a_refit_that_diverges_past_float_range_counts_as_failed(monkeypatch):
    """A bootstrap resample can let L-BFGS drive a log-scale past what exp() represents (seen on
    18 micro runs of journey_fit): that refit is counted as failed, not an OverflowError."""
    import components.eval.scaling_fit as scaling_fit

    real = scaling_fit._minimise
    calls = []

    def diverging(law, feats, log_y, starts, keep=8):
        theta = real(law, feats, log_y, starts, keep)
        calls.append(1)
        if len(calls) % 2 == 0:  # every second refit ends with the first scale at exp(800)
            theta = theta.copy()
            theta[1] = 800.0
        return theta

    monkeypatch.setattr(scaling_fit, "_minimise", diverging)
    fit = fit_scaling_law("chinchilla", {"N": N, "D": D}, chinchilla(N, D), bootstrap=6, seed=0)
    assert fit.failed_refits == 3 and all(np.isfinite(v) for pair in fit.intervals.values() for v in pair)
    assert fit.params["A"] == pytest.approx(TRUE["A"], rel=1e-4)
    assert scaling_fit._as_params(scaling_fit.LAWS["power"], np.array([0.0, 800.0, 1.0]))["A"] == np.inf


FP_TRUE = {"E": 3.0, "K": 4.0, "delta": 1.6, "nu": 1.2}


def fp_law(block, e, m):
    return FP_TRUE["E"] + FP_TRUE["K"] * np.log2(block) / ((e + 0.5) ** FP_TRUE["delta"] * (m + 0.5) ** FP_TRUE["nu"])


def test_the_fp_format_law_comes_back_and_predicts_held_out_formats():
    """Sun et al.'s format term at one N and D: the exponents come back from exact points, the
    optimal split is eq. 19's, and held-out formats are predicted where a constant is not."""
    e, m = np.array([1, 1, 2, 2, 3, 3, 1, 2, 4, 1]), np.array([0, 2, 0, 1, 1, 2, 1, 3, 0, 3])
    block = np.array([64, 16, 64, 8, 16, 64, 32, 64, 32, 8])
    held = {"block": [16.0, 64.0], "exp_bits": [2.0, 4.0], "man_bits": [2.0, 3.0]}
    held_y = fp_law(np.array(held["block"]), np.array(held["exp_bits"]), np.array(held["man_bits"]))
    x = {"block": block, "exp_bits": e, "man_bits": m}
    fit = fit_scaling_law("fp_format", x, fp_law(block, e, m), bootstrap=3, holdout=(held, held_y))
    assert fit.params == pytest.approx(FP_TRUE, rel=1e-3)
    share = FP_TRUE["delta"] / (FP_TRUE["delta"] + FP_TRUE["nu"])
    assert fit.extra["exp_bits_opt_p8"] == pytest.approx(8 * share - 0.5, rel=1e-3)
    assert fit.extra["exp_bits_opt_p8"] + fit.extra["man_bits_opt_p8"] == pytest.approx(7.0)
    assert fit.extra["holdout_max_rel_error"] < 1e-4
    constant = fit_scaling_law("constant", {}, fp_law(block, e, m), bootstrap=3, holdout=({}, held_y))
    assert constant.extra["holdout_max_rel_error"] > 0.05  # the held-out losses are not the mean


def test_a_block_of_one_has_no_log2_and_is_refused_by_name():
    with pytest.raises(ScalingFitError, match=r"log2\(block\) is not positive at \[1.0\]"):
        fit_scaling_law("fp_format", {"block": [1, 2, 4, 8, 16, 32], "exp_bits": [1] * 6, "man_bits": [1] * 6},
                        [3.0] * 6, where="fit fp")


def test_a_fit_naming_fewer_models_than_its_law_needs_is_refused_when_the_recipe_loads():
    """The evaluate stage's ``fits`` entry is validated with the recipe: the power law's 3
    parameters need 4 models to leave a residual, so 3 are refused before anything trains."""
    from pydantic import ValidationError

    from components.eval.scaling_fit import ScalingFitSpec

    fit = dict(name="width_law", law="power", metric="loss_all", variables={"x": "n_params"})
    with pytest.raises(ValidationError, match=r"3 models cannot fit the 3 parameters of the power law with "
                                              r"residuals left; name at least 4"):
        ScalingFitSpec(**fit, models=["a", "b", "c"])
    assert ScalingFitSpec(**fit, models=["a", "b", "c", "d"]).models == ["a", "b", "c", "d"]
    with pytest.raises(ValidationError, match=r"variables \['N'\] do not match the power law's \['x'\]"):
        ScalingFitSpec(**{**fit, "variables": {"N": "n_params"}}, models=["a", "b", "c", "d"])
