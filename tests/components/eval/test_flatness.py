"""Hutchinson's Hessian trace: exact on a diagonal quadratic, unbiased on a dense one, and
reproducible on a Llama whose attention implementation it leaves as it found it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from components.eval.flatness import hessian_trace


class Quadratic(nn.Module):
    """loss = 1/2 w^T A w, whose Hessian is A (an input_ids/labels forward like a causal LM)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype))
        self.config = SimpleNamespace(_attn_implementation="eager")

    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

    def forward(self, input_ids, labels):
        return SimpleNamespace(loss=0.5 * self.w @ self.a @ self.w)


def test_a_diagonal_hessian_is_measured_exactly():
    a = torch.diag(torch.tensor([1.0, 2.0, -0.5, 4.0], dtype=torch.float64))
    out = hessian_trace(Quadratic(a), torch.zeros(1, 1, dtype=torch.long), probes=4)
    assert out["hessian_trace"] == pytest.approx(6.5) and out["hessian_trace_se"] == pytest.approx(0.0, abs=1e-12)


def test_a_dense_hessian_is_estimated_without_bias():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 20, generator=g, dtype=torch.float64)
    a = (m + m.T) / 2
    out = hessian_trace(Quadratic(a), torch.zeros(1, 1, dtype=torch.long), probes=400, seed=1)
    assert abs(out["hessian_trace"] - float(torch.trace(a))) < 4 * out["hessian_trace_se"]
    assert out["hessian_trace_per_param"] == pytest.approx(out["hessian_trace"] / 20)


def test_a_llama_estimate_is_reproducible_and_its_attention_restored():
    from tests.components.train.test_trainer import nano, pattern_blocks

    model, blocks = nano(), torch.from_numpy(pattern_blocks()[:2].astype("int64"))
    own = model.config._attn_implementation
    first = hessian_trace(model, blocks, probes=3, seed=0)
    assert hessian_trace(model, blocks, probes=3, seed=0) == first
    assert model.config._attn_implementation == own
    assert torch.isfinite(torch.tensor(first["hessian_trace"])) and first["hessian_trace_se"] > 0


def test_too_few_probes_are_refused():
    with pytest.raises(ValueError, match="at least 2 probes"):
        hessian_trace(Quadratic(torch.eye(2)), torch.zeros(1, 1, dtype=torch.long), probes=1)


def test_the_evaluator_measures_every_model_on_the_same_first_blocks():
    from components.eval.standard import flatness_metrics
    from tests.components.train.test_trainer import nano, pattern_blocks

    blocks = {"prose": pattern_blocks(4, seed=1), "code": pattern_blocks(4, seed=2), "empty": pattern_blocks(4)[:0]}
    with torch.no_grad():  # as the evaluate stage calls it
        out = flatness_metrics(nano(), blocks, probes=2, blocks_per_domain=1)
    first_blocks = np.concatenate([blocks["code"][:1], blocks["prose"][:1]])  # domains in sorted order
    direct = hessian_trace(nano(), torch.from_numpy(first_blocks.astype("int64")), probes=2)
    assert out == direct
