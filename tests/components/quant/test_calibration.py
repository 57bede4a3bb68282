import numpy as np
import pytest
import torch

from components.model.presets import build_model
from components.quant.base import QuantizationError
from components.quant.calibration import (calibration_sample, capture_block_inputs, check_calibration,
                                          decoder_blocks, linear_groups)


@pytest.mark.parametrize("n", [8, 10])  # 10 = two full batches of 4 and a short one, which is kept
def test_block_replay_reproduces_the_model_exactly(n):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0).eval()
    tokens = torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, tokens, batch_size=4)
    assert len(inputs.batches) == -(-n // 4) and inputs.n_tokens == n * 32
    for block in decoder_blocks(model):
        inputs = inputs.run(block)
    with torch.no_grad():
        replayed = model.lm_head(model.model.norm(torch.cat(inputs.batches)))
        direct = model(input_ids=tokens).logits
    assert torch.equal(replayed, direct)
    assert linear_groups(decoder_blocks(model)[0])[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def test_sample_is_seeded_and_without_replacement():
    blocks = np.arange(40, dtype=np.int32).reshape(20, 2)
    a, b = calibration_sample(blocks, 10, seed=3), calibration_sample(blocks, 10, seed=3)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert len({tuple(r) for r in a.tolist()}) == 10
    assert not torch.equal(a, calibration_sample(blocks, 10, seed=4))


def test_bad_calibration_is_refused_naming_the_problem():
    with pytest.raises(QuantizationError, match="asks for 30 sequences but the training split has only 20"):
        calibration_sample(np.zeros((20, 8), np.int32), 30, 0)
    with pytest.raises(QuantizationError, match="calibration data is empty"):
        calibration_sample(np.zeros((0, 8), np.int32), 1, 0)
    with pytest.raises(QuantizationError, match="integer token ids"):
        check_calibration(torch.zeros(4, 8), "gptq")
    with pytest.raises(QuantizationError, match="too small: 4 sequences x 1 tokens"):
        check_calibration(torch.zeros(4, 1, dtype=torch.long), "gptq")
    with pytest.raises(QuantizationError, match="no decoder blocks"):
        decoder_blocks(torch.nn.Linear(2, 2))
