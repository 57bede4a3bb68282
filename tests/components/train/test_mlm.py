"""Masked language modelling: BERT's corruption at MosaicBERT's rate, an encoder that learns from
it through the shared trainer and resumes bit-exactly, and objectives that do not fit the model
refused both ways."""
from __future__ import annotations

import pytest
import torch

from components.model.presets import build_model
from components.train.mlm import IGNORE, MaskedLanguageModelling, check_objective, mask_tokens, pick_positions
from components.train.trainer import train
from tests.components.train.test_trainer import SEQ, VOCAB, assert_resume_is_exact, pattern_blocks


class ByteTokenizer:
    """Token id = byte value, for the control byte [MASK] (0x1f) among the 64 test ids."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def __len__(self) -> int:
        return VOCAB


def test_mask_tokens_picks_the_rate_per_row_and_splits_80_10_10():
    ids = torch.randint(2, 60, (400, 50), generator=torch.Generator().manual_seed(0))
    corrupted, labels = mask_tokens(ids, 0.3, mask_id=63, vocab_size=64, generator=torch.Generator().manual_seed(1))
    picked = labels != IGNORE
    assert (picked.sum(1) == 15).all()  # 30% of 50, every row
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(corrupted[~picked], ids[~picked])
    masked = (corrupted == 63) & picked
    changed = (corrupted != ids) & picked & ~masked
    assert masked.sum() / picked.sum() == pytest.approx(0.8, abs=0.02)
    assert changed.sum() / picked.sum() == pytest.approx(0.1 * 62 / 64, abs=0.02)  # a random token may equal the old
    again, _ = mask_tokens(ids, 0.3, 63, 64, torch.Generator().manual_seed(1))
    assert torch.equal(again, corrupted)  # a pure function of the generator's seed
    # the picking is pick_positions' (the masked_lm evaluator scores positions picked the same way)
    assert torch.equal(picked, pick_positions(400, 50, 0.3, torch.Generator().manual_seed(1)))


def mlm(**overrides):
    params = dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", mask_rate=0.3)
    params.update(overrides)
    config = MaskedLanguageModelling.Params(**params)
    method = MaskedLanguageModelling(config)
    method.use_tokenizer(ByteTokenizer())
    return config, method


def encoder(seed: int = 0):
    return build_model("encoder_nano_alibi", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed)


def test_an_encoder_learns_the_masked_tokens_of_counting_sequences():
    model = encoder()
    result = train(model, pattern_blocks(), *mlm(steps=80), progress=False)
    assert sum(result.losses[:5]) / 5 == pytest.approx(4.16, abs=0.1)  # ln 64: a uniform guess at first
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])  # 0.73 measured


def test_an_mlm_resume_is_bit_exact(tmp_path, monkeypatch):
    import tests.components.train.test_trainer as trainer_tests

    monkeypatch.setattr(trainer_tests, "nano", encoder)  # the helper builds its models with nano()
    assert_resume_is_exact(tmp_path, lambda: mlm(steps=12, checkpoint_every=4))


def test_objectives_that_do_not_fit_the_model_are_refused():
    decoder = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)
    with pytest.raises(ValueError, match="stage s: a masked-LM encoder trains with method 'mlm', not 'dense'"):
        check_objective(encoder(), "dense", "stage s")
    with pytest.raises(ValueError, match="stage s: method 'mlm' trains a masked-LM encoder .* not a causal decoder"):
        check_objective(decoder, "mlm", "stage s")
    check_objective(encoder(), "mlm", "stage s")
    check_objective(decoder, "dense", "stage s")
    with pytest.raises(ValueError, match=r"to_mask \(0.9\) \+ to_random \(0.2\) exceeds 1"):
        MaskedLanguageModelling.Params(to_mask=0.9, to_random=0.2)


def test_mlm_without_its_tokenizer_is_refused():
    config = MaskedLanguageModelling.Params(steps=2, batch_size=4, precision="fp32")
    with pytest.raises(ValueError, match=r"mlm needs the tokenizer for its \[MASK\] token"):
        train(encoder(), pattern_blocks(), config, MaskedLanguageModelling(config), progress=False)
