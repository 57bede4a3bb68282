"""Samplers inside the shared trainer: the default order is unchanged, the sampler's rows are the
rows trained on, resume stays bit-identical, and Skill-it moves weight to the hard skill."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from components.model.presets import build_model  # noqa: E402
from components.train.dense import DenseTraining  # noqa: E402
from components.train.samplers.registry import SAMPLERS  # noqa: E402
from components.train.trainer import TrainConfig, train  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 8


def two_skills(seed: int = 0):
    """'easy': constant blocks of one token (learnt in a few steps); 'hard': uniform random tokens
    (loss stays near ln 64). train rows: easy then hard, as train.npy concatenates sorted domains."""
    rng = np.random.default_rng(seed)
    easy = np.full((48, SEQ), 3, np.int32)
    hard = rng.integers(0, VOCAB, size=(48, SEQ)).astype(np.int32)
    validation = {"easy": np.full((8, SEQ), 3, np.int32),
                  "hard": rng.integers(0, VOCAB, size=(8, SEQ)).astype(np.int32)}
    return np.concatenate([easy, hard]), {"easy": (0, 48), "hard": (48, 96)}, validation


def nano():
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)


def config(**overrides) -> TrainConfig:
    params = dict(steps=12, batch_size=BATCH, lr=1e-2, warmup_steps=2, precision="fp32", log_every=100)
    params.update(overrides)
    return DenseTraining.Params(**params)


def sampler(key: str, cfg: TrainConfig, **params):
    blocks, skills, validation = two_skills()
    cls = SAMPLERS.get(key)
    s = cls(cls.Params(**params))
    s.bind(len(blocks), cfg.batch_size, cfg.seed, skills, validation)
    return s


class RecordingDense(DenseTraining):
    """Dense training that records the rows of every batch."""

    def on_batch(self, step, indices):
        self.seen = getattr(self, "seen", []) + [np.array(indices)]


def test_no_sampler_is_the_uniform_sampler_bit_for_bit():
    blocks, _, _ = two_skills()
    cfg = config(steps=6)
    default = train(nano(), blocks, cfg, DenseTraining(cfg), progress=False)
    explicit = train(nano(), blocks, cfg, DenseTraining(cfg), progress=False, sampler=sampler("uniform", cfg))
    assert default.losses == explicit.losses and default.sampler_facts == explicit.sampler_facts == {}


def test_trainer_trains_on_the_sampler_rows():
    blocks, _, _ = two_skills()
    cfg = config(steps=5)
    method, rs2 = RecordingDense(cfg), sampler("rs2", cfg, fraction=0.25)
    result = train(nano(), blocks, cfg, method, progress=False, sampler=rs2)
    expected = sampler("rs2", cfg, fraction=0.25)
    assert all(np.array_equal(seen, expected.indices(i)) for i, seen in enumerate(method.seen))
    assert result.sampler_facts["sampler_epoch_blocks"] == 24 and result.sampler_facts["sampler_unique_blocks"] == 40


def test_sampler_must_be_bound_to_the_training_run():
    blocks, _, _ = two_skills()
    cfg = config(steps=2)
    with pytest.raises(ValueError, match=r"sampler 'rs2' is bound to .* = \(96, 8, 1\) but training uses \(96, 8, 0\)"):
        bad = SAMPLERS.get("rs2")()
        bad.bind(96, 8, 1)
        train(nano(), blocks, cfg, DenseTraining(cfg), progress=False, sampler=bad)


def test_skill_it_shifts_weight_to_the_hard_skill():
    blocks, _, _ = two_skills()
    cfg = config(steps=20)
    skill_it = sampler("skill_it", cfg, eta=0.5, update_steps=5)
    logs = []
    result = train(nano(), blocks, cfg, DenseTraining(cfg), progress=False, sampler=skill_it,
                   on_log=lambda step, m: logs.append((step, m)))
    weight_logs = [(step, m["sampler_weight_hard"]) for step, m in logs if "sampler_weight_hard" in m]
    assert [step for step, _ in weight_logs] == [0, 5, 10, 15, 20]
    assert weight_logs[0][1] == 0.5 and weight_logs[-1][1] > 0.9
    facts = result.sampler_facts
    assert facts["sampler_val_loss_final_easy"] < 1.0 < 3.5 < facts["sampler_val_loss_final_hard"]
    assert facts["sampler_hardest_skill"] == "hard" and facts["sampler_hardest_weight_gain"] > 0.4
    assert facts["sampler_weight_initial_hard"] == 0.5 and facts["sampler_share_hard"] > 0.75
    assert facts["sampler_updates"] == 4


@pytest.mark.parametrize("key,params", [("rs2", {"fraction": 0.25}), ("skill_it", {"eta": 0.5, "update_steps": 3})])
def test_resume_after_interruption_is_bit_identical(tmp_path, key, params):
    blocks, _, _ = two_skills()
    cfg = config(steps=12, checkpoint_every=4)

    def run(directory, stop=None):
        model, logs = nano(), []
        s = sampler(key, cfg, **params)
        result = train(model, blocks, cfg, DenseTraining(cfg), checkpoint_dir=directory, progress=False,
                       stop_after_step=stop, sampler=s, on_log=lambda step, m: logs.append((step, m)))
        return model, result, s, logs

    straight_model, straight, straight_sampler, straight_logs = run(tmp_path / "a")
    _, first, _, first_logs = run(tmp_path / "b", stop=6)  # killed after step 6, last checkpoint at step 4
    assert first.steps == 6
    resumed_model, resumed, resumed_sampler, resumed_logs = run(tmp_path / "b")
    assert resumed.resumed_from_step == 4
    assert resumed.losses == straight.losses
    sa, sb = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed.sampler_facts == straight.sampler_facts
    assert resumed_sampler.state() == straight_sampler.state()
    if key == "skill_it":  # the resumed run redoes steps 5-12 and logs the same weights
        assert [x for x in straight_logs if x[0] > 4] == [x for x in resumed_logs]
        assert resumed.sampler_facts["sampler_updates"] == 4


def test_resume_with_another_sampler_is_an_error(tmp_path):
    blocks, _, _ = two_skills()
    cfg = config(steps=4, checkpoint_every=2)
    train(nano(), blocks, cfg, DenseTraining(cfg), checkpoint_dir=tmp_path, progress=False, stop_after_step=2,
          sampler=sampler("rs2", cfg))
    with pytest.raises(ValueError, match="written with sampler 'rs2', this run uses 'fixed_subset'"):
        train(nano(), blocks, cfg, DenseTraining(cfg), checkpoint_dir=tmp_path, progress=False,
              sampler=sampler("fixed_subset", cfg))
