"""The evaluate report's figures: what they draw from, and when there is nothing to draw."""
from __future__ import annotations

from components.eval.report_plots import (
    claims_against_bars,
    pareto_front,
    rank_correlation,
    perplexity_by_domain,
    size_against_quality,
    training_curves,
)

MODELS = {
    "fp32": {"ppl_prose": 30.0, "ppl_code": 12.0, "ppl_all": 20.0, "size_bytes": 4.0e6},
    "int8": {"ppl_prose": 30.5, "ppl_code": 12.1, "ppl_all": 20.3, "size_bytes": 1.1e6},
    "int4_bad": {"ppl_prose": 60.0, "ppl_code": 25.0, "ppl_all": 41.0, "size_bytes": 1.2e6},  # bigger and worse
    "int4": {"ppl_prose": 33.0, "ppl_code": 13.0, "ppl_all": 22.0, "size_bytes": 0.6e6},
}


def test_the_pareto_front_keeps_what_nothing_beats_on_both_size_and_quality():
    points = {n: (m["size_bytes"], m["ppl_all"]) for n, m in MODELS.items()}
    assert pareto_front(points) == ["int4", "int8", "fp32"]  # by size; int4_bad is beaten by int8
    assert pareto_front({"a": (1.0, 1.0), "b": (1.0, 1.0)}) == ["a", "b"]  # ties dominate nothing


def test_figures_are_drawn_as_png_files(tmp_path):
    claims = [
        {"name": "gptq_beats_rtn", "verdict": "PASS", "kind": "experiment", "slack": 0.8, "rhs": 24.0,
         "slack_interval": [0.2, 1.4]},
        {"name": "bits_budget", "verdict": "PASS", "kind": "accounting", "slack": 0.1, "rhs": 6.1},
        {"name": "unmeasured", "verdict": "FAIL", "kind": "experiment", "slack": None, "rhs": None},
    ]
    for path in (perplexity_by_domain(MODELS, ["code", "prose", "empty"], tmp_path / "a.png"),
                 size_against_quality(MODELS, tmp_path / "b.png"),
                 claims_against_bars(claims, tmp_path / "c.png"),
                 training_curves({"dense": {"steps": [1, 2, 3], "loss": [4.0, 3.5, 3.2]},
                                  "spdf": {"steps": [2, 4], "loss": [4.1, 3.6]}}, tmp_path / "d.png"),
                 rank_correlation({"values": [[1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]], "runs": list("abcd"),
                                   "columns": ["early", "final"], "result": {"spearman": 0.6}}, tmp_path / "e.png")):
        assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_to_draw_draws_nothing(tmp_path):
    assert training_curves({}, tmp_path / "d.png") is None
    assert training_curves({"empty": {"steps": [], "loss": []}}, tmp_path / "d.png") is None
    assert perplexity_by_domain({"m": {"ppl_all": 3.0}}, ["prose"], tmp_path / "a.png") is None
    assert size_against_quality({"eft": {"ppl_all": 3.0}, "m": {"ppl_all": 2.0, "size_bytes": 1.0}},
                                tmp_path / "b.png") is None  # one sized model is not a trade-off
    assert claims_against_bars([{"name": "x", "verdict": "FAIL", "slack": None, "rhs": 1.0}], tmp_path / "c.png") is None
    assert not list(tmp_path.iterdir())
