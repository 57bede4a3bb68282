"""Budgets: runs the machine cannot finish are refused before they start, with an override."""
from __future__ import annotations

import numpy as np
import pytest

from components import budget
from components.data.byte_bpe import ByteBpeTokenizer
from components.model.presets import build_model
from components.train.dense import DenseTraining
from components.train.trainer import train


def test_a_trillion_steps_is_refused_before_training(monkeypatch):
    monkeypatch.delenv(budget.ALLOW_ENV, raising=False)
    model = build_model("nano", vocab_size=64, max_seq_len=16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = DenseTraining.Params(steps=10**12, batch_size=8, precision="fp32")
    blocks = np.random.default_rng(0).integers(0, 64, (32, 16)).astype(np.int32)
    with pytest.raises(budget.BudgetError, match=r"training dense for 1,000,000,000,000 steps .* would take at least "
                                                 r"[\d.,]+ (years|days).*--allow-over-budget"):
        train(model, blocks, config, DenseTraining(config), progress=False)
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())  # not one step was taken


def test_the_limit_and_the_override(monkeypatch):
    flops_one_day = budget.peak_flops_per_second("cpu") * 86400
    monkeypatch.delenv(budget.ALLOW_ENV, raising=False)
    budget.check_compute(flops_one_day, "cpu", "a day")  # under the default week
    monkeypatch.setenv(budget.MAX_HOURS_ENV, "12")
    with pytest.raises(budget.BudgetError, match="beyond the 12-hour limit"):
        budget.check_compute(flops_one_day, "cpu", "a day")
    monkeypatch.setenv(budget.ALLOW_ENV, "1")
    budget.check_compute(flops_one_day, "cpu", "a day")


def test_a_billion_entry_vocabulary_is_refused_before_the_tokenizer_allocates(monkeypatch):
    monkeypatch.delenv(budget.ALLOW_ENV, raising=False)
    monkeypatch.setattr(budget, "available_memory_bytes", lambda: 24 * 10**9)  # this machine's size
    trainer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=10**9))
    with pytest.raises(budget.BudgetError, match=r"vocab_size=1,000,000,000 needs about 72.0 GB of memory; 24.0 GB"):
        trainer.train(["some text"] * 10)
