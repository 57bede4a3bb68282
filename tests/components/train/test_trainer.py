"""The shared trainer: learning, exact resume, NaN guard, precision."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

os.environ["HF_HUB_OFFLINE"] = "1"

from components.model.presets import build_model  # noqa: E402
from components.train import acceleration  # noqa: E402
from components.train.dense import DenseTraining  # noqa: E402
from components.train.trainer import (  # noqa: E402
    BatchOrder,
    NonFiniteLossError,
    TrainConfig,
    complete_checkpoints,
    resolve_precision,
    train,
)

VOCAB, SEQ = 64, 16


def pattern_blocks(n: int = 64, seed: int = 0) -> np.ndarray:
    """Counting sequences mod VOCAB from random starts: next token = previous + 1."""
    starts = np.random.default_rng(seed).integers(0, VOCAB, size=(n, 1))
    return ((starts + np.arange(SEQ)) % VOCAB).astype(np.int32)


def nano(seed: int = 0):
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed)


def dense(**overrides):
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32", log_every=1)
    params.update(overrides)
    config = DenseTraining.Params(**params)
    return config, DenseTraining(config)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_resume_is_exact(tmp_path: Path, make, blocks: np.ndarray | None = None) -> None:
    """Stopped at step 8 and resumed, a run ends with the losses and weights of one straight run.
    ``make()`` returns a fresh ``(config, method)`` with ``checkpoint_every=4`` and 12 steps;
    ``blocks`` default to ``pattern_blocks()``."""
    blocks = pattern_blocks() if blocks is None else blocks
    config, method = make()
    straight_model = nano()
    straight = train(straight_model, blocks, config, method, checkpoint_dir=tmp_path / "a", progress=False)
    config, method = make()
    train(nano(), blocks, config, method, checkpoint_dir=tmp_path / "b", progress=False, stop_after_step=8)
    resumed_model = nano()
    resumed = train(resumed_model, blocks, config, make()[1], checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from_step == 8 and resumed.losses == straight.losses
    assert states_equal(resumed_model, straight_model)


def test_loss_decreases_on_learnable_pattern():
    config, method = dense(steps=40, lr=1e-2)
    logs = []
    result = train(nano(), pattern_blocks(), config, method, progress=False, on_log=lambda s, d: logs.append((s, d)))
    assert len(result.losses) == result.steps == 40
    assert result.tokens == 40 * 8 * SEQ
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5])
    assert [s for s, _ in logs] == list(range(1, 41))
    assert set(logs[0][1]) == {"loss", "lr", "tokens_per_s"} and logs[-1][1]["tokens_per_s"] > 0
    assert result.train_flops == pytest.approx(method.flops_per_token(nano(), SEQ) * result.tokens)


def test_batch_order_is_a_function_of_step_and_covers_each_epoch():
    order = BatchOrder(n_blocks=10, batch_size=4, seed=3)
    first_epoch = np.concatenate([order.indices(0), order.indices(1), order.indices(2)[:2]])
    assert sorted(first_epoch) == list(range(10))  # step 2 straddles epochs 0 and 1
    assert np.array_equal(BatchOrder(10, 4, 3).indices(7), order.indices(7))
    assert not np.array_equal(BatchOrder(10, 4, 4).indices(0), order.indices(0))


def test_resume_is_bit_exact(tmp_path):
    config, method = dense(checkpoint_every=4)
    straight_model = nano()
    straight = train(straight_model, pattern_blocks(), config, method, checkpoint_dir=tmp_path / "a", progress=False)

    config, method = dense(checkpoint_every=4)
    first = train(nano(), pattern_blocks(), config, method, checkpoint_dir=tmp_path / "b",
                  progress=False, stop_after_step=8)
    assert first.steps == 8
    resumed_model = nano()
    resumed = train(resumed_model, pattern_blocks(), config, DenseTraining(config),
                    checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from_step == 8
    assert resumed.losses == straight.losses
    assert states_equal(resumed_model, straight_model)
    assert [step for step, _ in complete_checkpoints(tmp_path / "b")] == [8, 12]  # only the last 2 kept


def _flip_sign_of_first_row(checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    name = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[name][0] = -tensors[name][0]
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"step": checkpoint.name[5:].lstrip("0")})


@pytest.mark.parametrize("corrupt_both", [False, True])
def test_corrupt_checkpoint_is_skipped_and_the_resume_stays_exact(tmp_path, corrupt_both, caplog):
    """A sign-flipped row in the newest checkpoint used to resume silently into different weights."""
    config, method = dense(checkpoint_every=4)
    straight_model = nano()
    straight = train(straight_model, pattern_blocks(), config, method, progress=False)

    train(nano(), pattern_blocks(), config, dense(checkpoint_every=4)[1], checkpoint_dir=tmp_path,
          progress=False, stop_after_step=8)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [4, 8]
    _flip_sign_of_first_row(tmp_path / "step-0000008")
    if corrupt_both:
        (tmp_path / "step-0000004" / "trainer_state.pt").write_bytes(b"\0" * 64)
    resumed_model = nano()
    with caplog.at_level("WARNING", logger="paperdag.train"):
        resumed = train(resumed_model, pattern_blocks(), config, DenseTraining(config), checkpoint_dir=tmp_path,
                        progress=False)
    assert "step-0000008 is corrupt (model.safetensors does not match its recorded sha256)" in caplog.text
    assert resumed.resumed_from_step == (0 if corrupt_both else 4)
    if corrupt_both:
        assert "trainer_state.pt does not match" in caplog.text and "starts again from step 0" in caplog.text
    assert resumed.losses == straight.losses
    assert states_equal(resumed_model, straight_model)
    assert (tmp_path / "corrupt-step-0000008").is_dir()  # kept aside for a look, never resumed from


def test_tokens_per_second_counts_only_the_steps_this_call_ran(tmp_path):
    config, method = dense(checkpoint_every=4)
    train(nano(), pattern_blocks(), config, method, checkpoint_dir=tmp_path, progress=False, stop_after_step=8)
    resumed = train(nano(), pattern_blocks(), config, DenseTraining(config), checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_step == 8 and resumed.tokens == 12 * 8 * SEQ
    assert resumed.tokens_per_second == pytest.approx(4 * 8 * SEQ / resumed.wall_seconds)


def test_partial_checkpoints_are_ignored(tmp_path):
    config, method = dense(checkpoint_every=4)
    train(nano(), pattern_blocks(), config, method, checkpoint_dir=tmp_path, progress=False, stop_after_step=4)
    # a crash mid-write: a tmp dir with garbage and a final-named dir missing its state file
    (tmp_path / ".tmp-step-0000008-999").mkdir()
    (tmp_path / ".tmp-step-0000008-999" / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "step-0000009").mkdir()
    (tmp_path / "step-0000009" / "model.safetensors").write_bytes(b"garbage")
    result = train(nano(), pattern_blocks(), config, DenseTraining(config), checkpoint_dir=tmp_path, progress=False)
    assert result.resumed_from_step == 4 and result.steps == 12
    assert not (tmp_path / ".tmp-step-0000008-999").exists()


class NanAtStep3(DenseTraining):
    key = "nan_at_step_3"

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0

    def loss(self, model, batch, teacher):
        self.calls += 1
        loss = super().loss(model, batch, teacher)
        return loss * float("nan") if self.calls == 3 else loss


def test_nan_loss_raises_before_the_update():
    config = NanAtStep3.Params(steps=10, batch_size=4, precision="fp32")
    model = nano()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3"):
        train(model, pattern_blocks(), config, NanAtStep3(config), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_stop_ends_the_run_there_and_keeps_the_last_finite_weights():
    config = NanAtStep3.Params(steps=10, batch_size=4, precision="fp32", on_nonfinite="stop")
    model = nano()
    result = train(model, pattern_blocks(), config, NanAtStep3(config), progress=False)
    assert result.diverged_at_step == 3 and result.steps == 2 and len(result.losses) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.tokens == 2 * 4 * SEQ  # counts cover the finished steps only
    straight = train(nano(), pattern_blocks(), *dense(steps=10, batch_size=4, lr=config.lr,
                                                       warmup_steps=config.warmup_steps), progress=False)
    assert straight.diverged_at_step is None and result.losses == straight.losses[:2]


def test_on_nonfinite_stop_still_fails_when_no_step_finished():
    config, method = dense(steps=5, on_nonfinite="stop")
    method.loss = lambda model, batch, teacher: torch.tensor(float("inf"), requires_grad=True)
    with pytest.raises(NonFiniteLossError, match="at step 1: on_nonfinite 'stop', but no step finished"):
        train(nano(), pattern_blocks(), config, method, progress=False)


def test_exploding_lr_raises_non_finite():
    config, method = dense(steps=30, lr=1e30, grad_clip=0.0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \((nan|inf)\) at step \d+"):
        train(nano(), pattern_blocks(), config, method, progress=False)


def test_bf16_tracks_fp32():
    finals, curves = {}, {}
    for precision in ("fp32", "bf16"):
        config, method = dense(steps=60, lr=1e-2, precision=precision)
        result = train(nano(), pattern_blocks(), config, method, progress=False)
        assert result.precision == precision
        finals[precision] = float(np.mean(result.losses[-5:]))
        curves[precision] = result.losses
    assert curves["bf16"][0] != curves["fp32"][0]  # autocast really ran: the first forward already differs
    # bf16 autocast rounds activations to 8 mantissa bits; after 60 steps the curves agree closely
    assert finals["bf16"] == pytest.approx(finals["fp32"], rel=0.05)


def test_precision_resolution(monkeypatch):
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("BF16") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(acceleration, "_cpu_flags", lambda: {"avx2", "fma"})
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(acceleration, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(acceleration, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_precision("auto") == "bf16"
    assert TrainConfig(precision="FP32").precision == "fp32"


def test_bad_blocks_and_config_are_rejected():
    config, method = dense()
    with pytest.raises(ValueError, match=r"token ids in \[64, 64\].*64 entries"):
        train(nano(), np.full((4, SEQ), 64, dtype=np.int32), config, method, progress=False)
    with pytest.raises(ValueError, match="2-D integer"):
        train(nano(), np.zeros((4, SEQ), dtype=np.float32), config, method, progress=False)
    with pytest.raises(ValidationError, match=r"stps\n  Extra inputs are not permitted"):
        DenseTraining.Params(stps=3)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_stages_match_stage_0_and_resume_from_their_shards_bit_for_bit(tmp_path, zero_stage):
    config, method = dense(steps=6)
    reference = train(nano(), pattern_blocks(), config, method, progress=False).losses
    config, method = dense(steps=6, zero_stage=zero_stage, checkpoint_every=2)
    straight_model = nano()
    straight = train(straight_model, pattern_blocks(), config, method, progress=False).losses
    assert straight == pytest.approx(reference, abs=1e-5)
    train(nano(), pattern_blocks(), config, method, checkpoint_dir=tmp_path, stop_after_step=2, progress=False)
    assert (tmp_path / "step-0000002" / "optimizer-rank0.pt").is_file()
    resumed_model = nano()
    resumed = train(resumed_model, pattern_blocks(), config, method, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_step == 2 and resumed.losses == straight
    assert states_equal(resumed_model, straight_model)


def test_training_forwards_build_no_kv_cache_and_the_saved_config_keeps_it():
    caches = []

    class Recording(DenseTraining):
        def loss(self, model, batch, teacher):
            out = model(input_ids=batch, labels=batch)
            caches.append(out.past_key_values)
            return out.loss

    config, _ = dense(steps=3)
    model = nano()
    assert model.config.use_cache is True
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).past_key_values.get_seq_length()  # a cache outside training
    train(model, pattern_blocks(), config, Recording(config), progress=False)
    assert caches == [None, None, None]
    assert model.config.use_cache is True
