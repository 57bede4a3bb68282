"""Silent nonsense: a broken model or an impossible budget is an error, never a result."""
from __future__ import annotations

import pytest

from flows.cli import EXIT_FAILED
from tests.faults.helpers import no_run_left_running, runs, stage, temp_dirs


@pytest.mark.fault("clear_error")
def test_a_merge_that_blows_the_weights_up_is_an_error(nano_copy, capsys):
    """`scaling: 1e38` reported every perplexity as exactly 512 (the vocabulary size), rc 0."""
    before = sorted(nano_copy.glob("artifacts/merge/*"))
    capsys.readouterr()
    assert stage(nano_copy, "merge", "--set", "stages.merge.params={scaling: 1.0e+38}") == EXIT_FAILED
    err = capsys.readouterr().err
    assert "stage merge (merge/task_arithmetic) failed: DegenerateModelError" in err and "collapsed to a uniform distribution" in err
    assert sorted(nano_copy.glob("artifacts/merge/*")) == before and temp_dirs(nano_copy) == []
    failed = [r for r in runs(nano_copy) if r.data.tags.get("paperdag.stage") == "merge" and r.info.status == "FAILED"]
    assert len(failed) == 1 and no_run_left_running(nano_copy)


@pytest.mark.fault("clear_error")
def test_a_trillion_steps_is_refused_before_training(nano_copy, capsys):
    """`steps=10**12` started a 270-million-hour run."""
    capsys.readouterr()
    rc = stage(nano_copy, "pretrain_dense", "--set", "stages.pretrain_dense.params.steps=1000000000000")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "would take at least" in err and "--allow-over-budget" in err and len(err.strip().splitlines()) == 1
    assert not list(nano_copy.glob(".paperdag/checkpoints/*/step-*")) and no_run_left_running(nano_copy)


@pytest.mark.fault("clear_error")
def test_a_billion_entry_vocabulary_is_refused_before_the_tokenizer_allocates(nano_copy, capsys, monkeypatch):
    """`vocab_size=10**9` aborted in Rust asking for 71 GB, leaving a temp dir and a RUNNING run."""
    import components.budget as budget

    monkeypatch.setattr(budget, "available_memory_bytes", lambda: 24 * 10**9)  # this machine's size
    capsys.readouterr()
    assert stage(nano_copy, "tokenize", "--set", "stages.tokenize.params.vocab_size=1000000000") == EXIT_FAILED
    err = capsys.readouterr().err
    assert "vocab_size=1,000,000,000 needs about 72.0 GB of memory; 24.0 GB is available" in err
    assert "--allow-over-budget" in err
    assert temp_dirs(nano_copy) == [] and no_run_left_running(nano_copy)
