"""SPDF sparse pre-training and sparse fine-tuning keep their masks; FLOPs follow density."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from components.model.presets import build_model  # noqa: E402
from components.train.dense import DenseTraining  # noqa: E402
from components.train.method import block_linears  # noqa: E402
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS  # noqa: E402
from components.train.sparse_finetune import SparseFinetune  # noqa: E402
from components.train.spdf import SpdfTraining  # noqa: E402
from components.train.trainer import train  # noqa: E402

VOCAB, SEQ = 64, 16
COMMON = dict(steps=15, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32")


def pattern_blocks(n: int = 64) -> np.ndarray:
    starts = np.random.default_rng(0).integers(0, VOCAB, size=(n, 1))
    return ((starts + np.arange(SEQ)) % VOCAB).astype(np.int32)


def nano():
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_spdf_keeps_exact_zeros_and_density(precision):
    config = SpdfTraining.Params(**{**COMMON, "precision": precision}, sparsity=0.75, mask_seed=3)
    method = SpdfTraining(config)
    model = nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    linears = block_linears(model)
    assert set(method.masks) == set(linears) and len(linears) == 2 * 7
    for name, mask in method.masks.items():
        weight = linears[name].weight
        assert torch.count_nonzero(weight[~mask]) == 0, name
        assert torch.count_nonzero(weight[mask]) == mask.sum(), name  # live weights are trained, not zero
        assert abs(mask.float().mean().item() - 0.25) < 0.01, name
    assert result.method_facts["density"] == pytest.approx(0.25, abs=0.01)
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # lm_head stays dense


def test_spdf_flops_scale_block_linears_by_density():
    model = nano()
    n_block = sum(m.weight.numel() for m in block_linears(model).values())
    n_head = model.lm_head.weight.numel()
    attention = 6 * 2 * SEQ * 64  # 6 * n_layers * seq_len * d_attn
    dense_flops = DenseTraining(DenseTraining.Params()).flops_per_token(model, SEQ)
    assert dense_flops == 6 * (n_block + n_head) + attention
    spdf = SpdfTraining(SpdfTraining.Params(sparsity=0.5))
    spdf.prepare(model)
    assert spdf.flops_per_token(model, SEQ) == pytest.approx(6 * (0.5 * n_block + n_head) + attention, rel=1e-6)


def test_spdf_masks_are_seeded_and_validated():
    a, b = SpdfTraining(SpdfTraining.Params(mask_seed=1)), SpdfTraining(SpdfTraining.Params(mask_seed=1))
    masks_a, masks_b = a.build_masks(nano()), b.build_masks(nano())
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    other = SpdfTraining(SpdfTraining.Params(mask_seed=2)).build_masks(nano())
    assert not all(torch.equal(masks_a[k], other[k]) for k in masks_a)
    for outside in (1.0, 0.0, -0.1):
        with pytest.raises(ValueError, match=rf"sparsity must be in \(0, 1\).*got {outside}"):
            SpdfTraining.Params(sparsity=outside)


def test_spdf_resume_is_bit_exact(tmp_path):
    config = SpdfTraining.Params(**COMMON, sparsity=0.5, checkpoint_every=5)
    straight_model = nano()
    straight = train(straight_model, pattern_blocks(), config, SpdfTraining(config), progress=False)
    train(nano(), pattern_blocks(), config, SpdfTraining(config), checkpoint_dir=tmp_path, progress=False,
          stop_after_step=10)
    resumed_model = nano()
    resumed = train(resumed_model, pattern_blocks(), config, SpdfTraining(config), checkpoint_dir=tmp_path,
                    progress=False)
    assert resumed.resumed_from_step == 10
    assert resumed.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), resumed_model.parameters()))


def test_a_checkpoint_mask_of_the_wrong_shape_is_refused_on_resume(tmp_path):
    """A mask that does not fit its layer (here transposed, with the checksums rewritten so the
    checkpoint still reads as intact) stops the resume naming the layer and both shapes, instead
    of training with a broadcast mask."""
    import json

    from components.train.trainer import CHECKSUMS_FILE, STATE_FILE, _sha256, complete_checkpoints

    config = SpdfTraining.Params(**COMMON, sparsity=0.5, checkpoint_every=5)
    train(nano(), pattern_blocks(), config, SpdfTraining(config), checkpoint_dir=tmp_path, progress=False,
          stop_after_step=5)
    (_, checkpoint), = complete_checkpoints(tmp_path)
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    key = sorted(k for k in state["method_state"] if k.endswith("mlp.down_proj"))[0]
    state["method_state"][key] = state["method_state"][key].T.contiguous()
    torch.save(state, checkpoint / STATE_FILE)
    checksums = json.loads((checkpoint / CHECKSUMS_FILE).read_text())
    checksums[STATE_FILE] = {"bytes": (checkpoint / STATE_FILE).stat().st_size, "sha256": _sha256(checkpoint / STATE_FILE)}
    (checkpoint / CHECKSUMS_FILE).write_text(json.dumps(checksums))
    rows, cols = state["method_state"][key].shape
    with pytest.raises(ValueError, match=rf"mask for {key.removeprefix('mask.')} has shape \({rows}, {cols}\), "
                                         rf"weight \({cols}, {rows}\)"):
        train(nano(), pattern_blocks(), config, SpdfTraining(config), checkpoint_dir=tmp_path, progress=False)


def test_sparse_finetune_keeps_the_input_zero_pattern():
    model = nano()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for linear in block_linears(model).values():
            linear.weight.mul_(torch.rand(linear.weight.shape, generator=generator) > 0.6)
    zero_before = {n: (m.weight == 0).clone() for n, m in block_linears(model).items()}
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    config = SparseFinetune.Params(**COMMON)
    result = train(model, pattern_blocks(), config, SparseFinetune(config), progress=False)
    for name, linear in block_linears(model).items():
        assert torch.equal(linear.weight == 0, zero_before[name]), name
        assert not torch.equal(linear.weight, before[name]), name
    assert result.method_facts["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_registries():
    assert PRETRAIN_METHODS.keys() == ["adapt", "bipft", "dense", "dfp", "double_rounding", "fim", "fp_training", "galore", "gradual_pruning", "halo", "lora", "masked_thought", "mlm", "qat",
                                       "qfx", "retro", "self_sampled", "sltrain", "spdf", "sr_ste", "ul2"]
    assert FINETUNE_METHODS.keys() == ["adapt", "bert2bert", "bipft", "compacter", "dense", "dfp", "double_rounding", "fim", "fp_training", "galore", "gradual_pruning", "halo", "hedgehog", "hft", "l4q", "lora",
                                       "masked_thought", "mlm", "perp", "qat", "qfx", "retro", "self_sampled", "sparse", "sr_ste", "ul2", "vcycle_coalesce"]
    assert PRETRAIN_METHODS.get("spdf").paper.arxiv == "2303.10464"
