"""keep_checkpoints: the trainer keeps the model's weights at the asked fractions of training,
exactly the weights of that step, across a resume; what it cannot keep is refused by name."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from components.train.sltrain import SLTrain
from components.train.trainer import KEPT_DIR, MODEL_FILE, load_weights, train
from tests.components.train.test_trainer import dense, nano, pattern_blocks, states_equal


def kept_model(checkpoint_dir, step: int):
    model = nano()
    load_weights(model, checkpoint_dir / KEPT_DIR / f"step-{step:07d}" / MODEL_FILE)
    return model


def test_kept_checkpoints_are_the_weights_of_their_steps_across_a_resume(tmp_path):
    blocks = pattern_blocks()
    config, method = dense(keep_checkpoints=(0.0, 0.25, 0.5), checkpoint_every=4)  # steps 0, 3, 6 of 12
    # interrupted after step 4 (kept 0 and 3, resume checkpoint at 4), then resumed to the end
    train(nano(), blocks, config, method, checkpoint_dir=tmp_path, progress=False, stop_after_step=4)
    assert sorted(p.name for p in (tmp_path / KEPT_DIR).iterdir()) == ["step-0000000", "step-0000003"]
    resumed = train(nano(), blocks, config, dense(keep_checkpoints=(0.0, 0.25, 0.5), checkpoint_every=4)[1],
                    checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_step == 4
    assert sorted(p.name for p in (tmp_path / KEPT_DIR).iterdir()) == ["step-0000000", "step-0000003", "step-0000006"]
    assert states_equal(kept_model(tmp_path, 0), nano())  # before the first step: the initial model
    for step in (3, 6):  # a straight run stopped after that step holds the same weights
        stopped = nano()
        train(stopped, blocks, *dense(), progress=False, stop_after_step=step)
        assert states_equal(kept_model(tmp_path, step), stopped)


def test_what_cannot_be_kept_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints needs a checkpoint_dir"):
        train(nano(), pattern_blocks(), *dense(keep_checkpoints=(0.5,)), progress=False)
    config = SLTrain.Params(steps=4, batch_size=8, rank=4, precision="fp32", keep_checkpoints=(0.5,))
    with pytest.raises(ValueError, match="method 'sltrain' trains through modules of its own"):
        train(nano(), pattern_blocks(), config, SLTrain(config), checkpoint_dir=tmp_path, progress=False)
    assert not (tmp_path / KEPT_DIR).exists()
    with pytest.raises(ValidationError, match=r"fractions in \[0, 1\)"):
        dense(keep_checkpoints=(1.0,))
    with pytest.raises(ValidationError, match="increasing and fall on distinct steps of the 12"):
        dense(keep_checkpoints=(0.5, 0.25))
    with pytest.raises(ValidationError, match="distinct steps"):
        dense(keep_checkpoints=(0.5, 0.51))  # both step 6
