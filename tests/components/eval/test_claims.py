import math

import pytest
from pydantic import ValidationError

from components.eval.claims import Claim, ClaimError, check_claims

METRICS = {
    "finetune_spdf": {"ppl_all": 41.2, "loss": 3.7},
    "finetune_dense": {"ppl_all": 45.3},
    "quantize": {"bits_per_weight": 4.125, "ppl": float("nan")},
}


def claim(**kw):
    base = dict(name="c", statement="s", metric="finetune_spdf.ppl_all", op="<=", than="finetune_dense.ppl_all")
    return Claim(**(base | kw))


def test_pass_and_fail():
    passed, failed = check_claims([claim(), claim(op=">")], METRICS)
    assert passed["passed"] is True and failed["passed"] is False
    assert passed["lhs"] == 41.2 and passed["rhs"] == 45.3
    assert passed["detail"] == ("finetune_spdf.ppl_all = 41.2 <= finetune_dense.ppl_all (= 45.3): PASS")


def test_factor_and_margin_arithmetic():
    [r] = check_claims([claim(op="<", than="finetune_dense.ppl_all", factor=0.9, margin=0.5)], METRICS)
    assert r["rhs"] == pytest.approx(0.9 * 45.3 + 0.5)  # 41.27
    assert r["passed"] is True  # 41.2 < 41.27
    assert r["detail"] == ("finetune_spdf.ppl_all = 41.2 < 0.90 × finetune_dense.ppl_all (= 45.3) + 0.5 "
                           "= 41.27: PASS")
    [r] = check_claims([claim(op="<", factor=0.9, margin=0.4)], METRICS)  # 41.17
    assert r["passed"] is False
    [r] = check_claims([claim(metric="quantize.bits_per_weight", op="<=", than=4.2)], METRICS)
    assert r["passed"] is True and r["rhs"] == 4.2
    [r] = check_claims([claim(metric="quantize.bits_per_weight", op=">=", than="4.125")], METRICS)
    assert r["passed"] is True  # a quoted number is a number, not stage "4"
    [r] = check_claims([claim(metric="quantize.bits_per_weight", op="<", than=5, margin=-1.0)], METRICS)
    assert r["rhs"] == 4.0 and r["passed"] is False


def test_missing_reference_lists_available():
    with pytest.raises(ClaimError) as err:
        check_claims([claim(name="sparse_wins", than="finetune_dense.ppl_wiki")], METRICS)
    message = str(err.value)
    assert "'sparse_wins'" in message and "stage 'finetune_dense' has no metric 'ppl_wiki'" in message
    assert "its metrics: ppl_all" in message
    with pytest.raises(ClaimError, match=r"'nostage.ppl' names no evaluated stage; evaluated stages: finetune_dense, "):
        check_claims([claim(metric="nostage.ppl")], METRICS)


def test_non_finite_fails_with_reason():
    [r] = check_claims([claim(metric="quantize.ppl", than=100.0)], METRICS)
    assert r["passed"] is False and math.isnan(r["lhs"])
    assert "quantize.ppl is not a finite number" in r["detail"]
    [r] = check_claims([claim(than="x.y")], METRICS | {"x": {"y": float("inf")}})
    assert r["passed"] is False and "right-hand side is not a finite number" in r["detail"]
    [r] = check_claims([claim(than="x.y")], METRICS | {"x": {"y": None}})
    assert r["passed"] is False and "None" in r["detail"]


def test_claim_validation():
    with pytest.raises(ValidationError, match="extra"):
        claim(unknown=1)
    with pytest.raises(ValidationError, match="op"):
        claim(op="==")
    with pytest.raises(ValidationError, match="stage.metric"):
        claim(metric="ppl_all")
    with pytest.raises(ValidationError, match="stage.metric"):
        claim(than="ppl_all")
    with pytest.raises(ValidationError, match="factor"):
        claim(factor=float("nan"))


def test_plus_terms_express_a_share_of_a_gain():
    metrics = {"base": {"ppl": 100.0}, "ft": {"ppl": 50.0}, "c": {"ppl": 54.0}, "d": {"ppl": 56.0}}
    keeps_90 = dict(op="<=", than="ft.ppl", factor=0.9, plus={"base.ppl": 0.1}, statement="s")
    ok, bad = check_claims([Claim(name="c", metric="c.ppl", **keeps_90), Claim(name="d", metric="d.ppl", **keeps_90)], metrics)
    assert ok["rhs"] == pytest.approx(55.0) and ok["passed"] and not bad["passed"]
    assert "0.10 × base.ppl (= 100)" in ok["detail"]
    with pytest.raises(ValidationError, match="plus keys"):
        Claim(name="x", statement="s", metric="c.ppl", op="<", than=1.0, plus={"nodot": 1.0})
