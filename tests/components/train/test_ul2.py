"""UL2's mixture of denoisers: examples drawn per (seed, step), loss on targets only, a real
training run that learns, an exact resume, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.data.denoising import FIM_BYTES, MODE_BYTES, SENTINEL_BYTES
from components.data.text_code import MATCH_BYTES
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS
from components.train.trainer import train
from components.train.ul2 import IGNORE, MixtureOfDenoisers
from tests.components.train.test_trainer import SEQ, VOCAB, assert_resume_is_exact, nano

TEXT_VOCAB = 36  # block ids stay below the ids the fake tokenizer gives the control bytes


class ControlBytes:
    """A tokenizer stand-in: each control byte is one token id at the top of the nano vocabulary."""

    pad_token_id = eos_token_id = TEXT_VOCAB
    ids = {chr(b): VOCAB - 1 - i for i, b in enumerate([*MODE_BYTES.values(), *SENTINEL_BYTES, *FIM_BYTES.values(),
                                                             *MATCH_BYTES.values()])}

    def encode(self, text, add_special_tokens=False):
        return [self.ids[text]]


def blocks(n: int = 64) -> np.ndarray:
    starts = np.random.default_rng(0).integers(0, TEXT_VOCAB, size=(n, 1))
    return ((starts + np.arange(SEQ)) % TEXT_VOCAB).astype(np.int32)


def ul2(**overrides) -> tuple[MixtureOfDenoisers.Params, MixtureOfDenoisers]:
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32")
    params.update(overrides)
    config = MixtureOfDenoisers.Params(**params)
    method = MixtureOfDenoisers(config)
    method.use_tokenizer(ControlBytes())
    return config, method


def test_registered_for_pretraining_and_finetuning_with_the_papers_seven_denoisers():
    assert PRETRAIN_METHODS.get("ul2") is FINETUNE_METHODS.get("ul2") is MixtureOfDenoisers
    denoisers = MixtureOfDenoisers.Params().denoisers
    assert [(d.mode, d.mean_span, d.corruption) for d in denoisers if d.mode != "S"] == [
        ("R", 3, 0.15), ("R", 8, 0.15), ("X", 3, 0.5), ("X", 8, 0.5), ("X", 64, 0.15), ("X", 64, 0.5)]
    assert [d.corruption for d in denoisers if d.mode == "S"] == [0.25]


def test_examples_are_a_function_of_seed_and_step_and_only_targets_carry_loss():
    _, method = ul2()
    batch = torch.from_numpy(blocks(8)).long()
    ids, labels, modes = method.denoise_batch(batch, step=3)
    again = method.denoise_batch(batch, step=3)
    assert torch.equal(ids, again[0]) and torch.equal(labels, again[1]) and modes == again[2]
    assert not torch.equal(ids, method.denoise_batch(batch, step=4)[0])
    mode_ids = {ControlBytes.ids[chr(b)]: m for m, b in MODE_BYTES.items()}
    for row, mode in zip(range(len(ids)), modes):
        assert mode_ids[int(ids[row, 0])] == mode
        scored = labels[row] != IGNORE
        first, last = int(scored.nonzero()[0]), int(scored.nonzero()[-1])
        assert first > 1 and bool(scored[first:last + 1].all())  # one run of targets after the input
        assert torch.equal(labels[row][scored], ids[row][scored])
        assert (ids[row, last + 1:] == ControlBytes.pad_token_id).all()  # the tail is padding
    # weights pick the mixture: only the prefix-LM denoiser
    _, s_only = ul2(denoisers=[{"mode": "S", "corruption": 0.25}])
    assert set(s_only.denoise_batch(batch, step=1)[2]) == {"S"}


def test_codet5p_settings_causal_rows_and_a_random_pivot():
    """CodeT5+'s mixture is a setting: C rows are the block itself with loss on every token; an S
    denoiser with corruption_max draws its pivot per example."""
    _, method = ul2(denoisers=[{"mode": "C"}, {"mode": "S", "corruption": 0.1, "corruption_max": 0.9}])
    batch = torch.from_numpy(blocks(8)).long()
    inputs = set()
    for step in range(1, 6):
        ids, labels, modes = method.denoise_batch(batch, step)
        for row, mode in enumerate(modes):
            if mode == "C":
                assert torch.equal(ids[row], batch[row]) and torch.equal(labels[row], batch[row])
            else:
                inputs.add(int((labels[row] == IGNORE).sum()))
    assert set(modes) <= {"C", "S"} and len(inputs) >= 4  # the S split moves between examples


def test_trains_and_learns_and_resumes_exactly(tmp_path):
    config, method = ul2(steps=40, log_every=1)
    result = train(nano(), blocks(), config, method, progress=False)
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    assert result.method_facts == {"ul2_denoisers": 7}
    assert_resume_is_exact(tmp_path, lambda: ul2(checkpoint_every=4), blocks())


def test_refusals_name_what_is_wrong():
    with pytest.raises(ValidationError, match="corruption"):
        MixtureOfDenoisers.Params(denoisers=[{"mode": "X", "corruption": 1.0}])
    with pytest.raises(ValidationError, match="mode"):
        MixtureOfDenoisers.Params(denoisers=[{"mode": "Q", "corruption": 0.5}])
    with pytest.raises(ValidationError, match="denoiser C \\(plain causal LM\\) takes no corruption"):
        MixtureOfDenoisers.Params(denoisers=[{"mode": "C", "corruption": 0.5}])
    with pytest.raises(ValidationError, match="denoiser R needs corruption"):
        MixtureOfDenoisers.Params(denoisers=[{"mode": "R"}])
    with pytest.raises(ValidationError, match="applies to the S denoiser only"):
        MixtureOfDenoisers.Params(denoisers=[{"mode": "X", "corruption": 0.2, "corruption_max": 0.5}])
    with pytest.raises(ValidationError, match="at least 1"):
        MixtureOfDenoisers.Params(denoisers=[])
    no_tokenizer = MixtureOfDenoisers(MixtureOfDenoisers.Params(steps=2, batch_size=2))
    with pytest.raises(ValueError, match="use_tokenizer"):
        train(nano(), blocks(), no_tokenizer.params, no_tokenizer, progress=False)
    _, method = ul2()
    clash = torch.from_numpy(blocks(2)).long()
    clash[1, 3] = ControlBytes.ids[chr(SENTINEL_BYTES[0])]
    with pytest.raises(ValueError, match="ul2 \\(step 1\\): the data holds token id"):
        method.denoise_batch(clash, step=1)
