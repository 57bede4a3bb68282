"""The merge stage refuses checkpoints whose tokenizers differ, before touching any weights."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from components.merge.base import MergeError
from components.merge.uniform_soup import UniformSoup
from tasks import merge as merge_task
from tasks.artifacts import Artifact


def _artifact(path: Path, vocab: str) -> Artifact:
    path.mkdir()
    (path / "tokenizer.json").write_text(vocab)
    return Artifact(path, {"digest": path.name * 4, "kind": "finetune", "files": {}})


def test_mismatched_tokenizers_name_the_checkpoint(tmp_path):
    a = _artifact(tmp_path / "a", '{"vocab": {"x": 0}}')
    b = _artifact(tmp_path / "b", '{"vocab": {"y": 0}}')
    ctx = SimpleNamespace(
        method=UniformSoup(), inputs={"models": [a, b]},
        plan=SimpleNamespace(name="merge", method="uniform_soup", inputs={"models": ["prose_ft", "code_ft"]}),
        out_dir=tmp_path / "out")
    with pytest.raises(MergeError, match="checkpoint 'code_ft' has a different tokenizer from 'prose_ft'"):
        merge_task.run(ctx)
    assert not (tmp_path / "out").exists()


def test_every_merger_has_the_params_the_merge_stage_reads():
    """The merge stage reads `validation_domain` of every method (greedy_soup once lacked it, and
    its stage failed with an AttributeError only when a recipe ran it)."""
    from components.merge.base import MergerParams
    from components.merge.registry import MERGERS

    for key in MERGERS.keys():
        params = MERGERS.get(key).Params()
        assert isinstance(params, MergerParams), key
        assert params.validation_domain is None, key


def test_greedy_soup_refuses_weights_it_would_ignore():
    from pydantic import ValidationError

    from components.merge.greedy_soup import GreedySoup

    with pytest.raises(ValidationError, match="weights do not apply"):
        GreedySoup.Params(weights=[0.5, 0.5])
