"""Test-wide settings: never touch the network, the real ~/.prefect or the repo's state."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


if "PYTEST_XDIST_WORKER" in os.environ:
    # Each worker (and every CLI subprocess it starts, through the environment) gets its share of
    # the cores, as parallel stages do; set before torch is imported. Without it two workers' OpenMP
    # pools spin against each other on 2 cores: the suite took 898 s instead of 472 s.
    from flows.parallel import threads_per_stage

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_stage(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PAPERDAG_WORKSPACE", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ws


@pytest.fixture(scope="session")
def char_tokenizer():
    """A character-level tokenizer for arithmetic text (ids < 64, fits the nano vocab)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for ch in "0123456789+-= \n":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
