import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from components.model.presets import build_model
from components.quant.base import QuantizationError
from components.quant.fake_quant import round_ste
from components.quant.reconstruction import (IntGrid, LearnableQuant, ReconstructionConfig, linear_output_errors,
                                             reconstruct, reconstruction_loss, to_fp16_step, window_spans)
from components.quant.rtn import quantize_tensor

GRID = IntGrid(4, "per_channel", 128, True)


def nano(seed=0):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed)


def four_blocks():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tokens(n=16, length=16, seed=0):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


class LearnedStep:
    """A minimal LearnableQuant: RTN's grid with a learnable (LSQ-style) step per output channel."""

    created = 0

    def __init__(self, weight, grid=GRID):
        LearnedStep.created += 1
        self.weight, self.grid = weight.detach().clone(), grid
        _, scales, _, _ = quantize_tensor(self.weight, grid.bits, grid.granularity, grid.group_size, True)
        self.log_step = torch.nn.Parameter(torch.log(scales.float()))
        self.steps_seen = 0

    def parameters(self):
        return [self.log_step]

    def fake_weight(self):
        step = torch.exp(self.log_step).unsqueeze(-1)
        low, high = self.grid.code_range
        zero = self.grid.implicit_zero
        q = round_ste(torch.clamp(self.grid.view(self.weight) / step + zero, low, high))
        return ((q - zero) * step).reshape(self.weight.shape)

    def regularization(self, step):
        self.steps_seen += 1
        return 0.0

    def finalize(self):
        with torch.no_grad():
            return self.grid.quantize(self.weight, torch.exp(self.log_step))


def targets_of(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def run(model, mode="block", iters=30, **kw):
    config = ReconstructionConfig(mode=mode, iters=iters, lr=1e-2, progress=False, **kw)
    return reconstruct(model, tokens(), lambda name, linear: LearnedStep(linear.weight), config, targets_of(model))


def test_protocol_is_runtime_checkable():
    assert isinstance(LearnedStep(torch.randn(4, 8)), LearnableQuant)
    assert not isinstance(object(), LearnableQuant)


def test_window_spans():
    assert window_spans(4, ReconstructionConfig(mode="block")) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert window_spans(4, ReconstructionConfig(mode="window", window=2, overlap=1)) == [(0, 2), (1, 3), (2, 4)]
    assert window_spans(4, ReconstructionConfig(mode="window", window=3, overlap=1)) == [(0, 3), (2, 4)]
    assert window_spans(4, ReconstructionConfig(mode="window", window=2, overlap=0)) == [(0, 2), (2, 4)]
    assert window_spans(2, ReconstructionConfig(mode="window", window=3, overlap=2)) == [(0, 2)]


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_every_unit_improves_and_model_is_untouched(mode):
    model = nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    result = run(model, mode)
    units = targets_of(model) if mode == "layer" else ["blocks.0", "blocks.1"]
    assert list(result.metrics) == units
    for unit, m in result.metrics.items():
        assert m["loss_after"] < m["loss_before"], unit
    # the fp model keeps its weights, structure and has no gradients
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert all(p.grad is None for p in model.parameters())
    assert set(result.weights) == {f"{n}.weight" for n in targets_of(model)}


def test_window_mode_with_overlap_reoptimises_shared_blocks_and_finalises_each_once():
    model = four_blocks()
    LearnedStep.created = 0
    result = run(model, "window", iters=20, window=2, overlap=1)
    assert list(result.metrics) == ["blocks.0-1", "blocks.1-2", "blocks.2-3"]
    for unit, m in result.metrics.items():
        assert m["loss_after"] < m["loss_before"], unit
    assert LearnedStep.created == 28  # one learnable object per Linear, reused across windows
    steps = {name: q.steps_seen for name, q in result.quants.items()}
    assert steps["model.layers.0.mlp.up_proj"] == 20
    assert steps["model.layers.1.mlp.up_proj"] == 40  # block 1 and 2 sit in two windows
    assert steps["model.layers.2.mlp.up_proj"] == 40
    assert steps["model.layers.3.mlp.up_proj"] == 20
    assert len(result.weights) == 28


def test_input_stream_fp_vs_quantized():
    model = nano()
    quantized, fp = run(model, input_stream="quantized"), run(model, input_stream="fp")
    # block 0 sees the same inputs either way; block 1 sees block 0's quantized outputs or fp ones
    assert quantized.metrics["blocks.0"] == fp.metrics["blocks.0"]
    assert quantized.metrics["blocks.1"]["loss_before"] > fp.metrics["blocks.1"]["loss_before"]


def test_deterministic_for_a_seed():
    a, b = run(nano(), "layer", iters=10), run(nano(), "layer", iters=10)
    for name in a.weights:  # codes, scales, zeros (None: symmetric) and the dequantized weights
        for x, y in zip(a.weights[name], b.weights[name]):
            assert (x is None and y is None) or torch.equal(x, y), name
    c = run(nano(), "layer", iters=10, seed=1)
    assert any(not torch.equal(a.weights[n][3], c.weights[n][3]) for n in a.weights)


def test_finalized_codes_lie_on_the_grid():
    result = run(nano(), "block", iters=10)
    for name, (codes, scales, zeros, dequant) in result.weights.items():
        assert codes.dtype == torch.uint8 and scales.dtype == torch.float16 and zeros is None
        assert int(codes.min()) >= 1 and int(codes.max()) <= 15  # symmetric 4-bit: 8 +- 7
        expected = (codes.float().reshape(scales.shape[0], 1, -1) - 8) * scales.float().unsqueeze(-1)
        assert torch.equal(expected.reshape(dequant.shape), dequant), name


def test_losses():
    fp = torch.randn(3, 5, 8)
    cfg = ReconstructionConfig()
    assert float(reconstruction_loss(fp, fp, cfg)) == 0
    # "mse" sums over features and averages over tokens
    assert float(reconstruction_loss(fp + 1, fp, cfg)) == pytest.approx(8.0)
    cos = ReconstructionConfig(loss="mse+cos", cos_weight=2.0)
    assert float(reconstruction_loss(2 * fp, fp, cos)) == pytest.approx(float(fp.pow(2).sum(-1).mean()), rel=1e-5)
    assert float(reconstruction_loss(-fp, fp, cos)) == pytest.approx(float((2 * fp).pow(2).sum(-1).mean()) + 4.0,
                                                                     rel=1e-5)
    result = run(nano(), "block", iters=10, loss="mse+cos")
    assert all(m["loss_after"] < m["loss_before"] for m in result.metrics.values())


def test_int_grid_encode_and_quantize():
    w = torch.randn(6, 32)
    grid = IntGrid(3, "group", 8, False)
    step = torch.rand(6, 4) * 0.1 + 0.05
    zero = torch.full((6, 4), 3.0)
    codes, scales, zeros, dequant = grid.quantize(w, step, zero)
    assert codes.shape == (6, 32) and scales.shape == zeros.shape == (6, 4) and int(codes.max()) <= 7
    rebuilt = (codes.float().reshape(6, 4, 8) - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    assert torch.equal(rebuilt.reshape(6, 32), dequant)
    with pytest.raises(QuantizationError, match="off the 3-bit grid"):
        grid.encode(torch.full((6, 4, 8), 8.0), scales, zero, (6, 32))
    with pytest.raises(QuantizationError, match="off the 3-bit grid"):
        grid.encode(torch.full((6, 4, 8), 2.5), scales, zero, (6, 32))
    with pytest.raises(QuantizationError, match=r"group_size=8 does not divide its input width 12"):
        grid.check(torch.zeros(2, 12), "w")
    assert to_fp16_step(torch.tensor([1e-12, 1e9])).tolist() == [pytest.approx(6.1035e-05, rel=1e-3), 65504.0]


def test_linear_output_errors_zero_for_exact_weights_and_positive_for_rtn():
    model = nano()
    held = tokens(4, 16, seed=1)
    exact = {f"{n}.weight": m.weight.detach() for n, m in model.named_modules() if n in targets_of(model)}
    assert all(v == 0 for v in linear_output_errors(model, exact, held).values())
    rtn = {k: quantize_tensor(v, 3, "per_channel", 128, True)[3] for k, v in exact.items()}
    assert all(v > 0 for v in linear_output_errors(model, rtn, held).values())


@pytest.mark.parametrize("bad, message", [
    (dict(mode="blocks"), "unknown reconstruction mode 'blocks'"),
    (dict(input_stream="int"), "unknown input_stream 'int'"),
    (dict(loss="kl"), "unknown reconstruction loss 'kl'"),
    (dict(mode="window", window=2, overlap=2), "window=2, overlap=2"),
    (dict(batch_size=0), "batch_size=0"),
])
def test_bad_config(bad, message):
    with pytest.raises(QuantizationError, match=message):
        reconstruct(nano(), tokens(), lambda n, l: LearnedStep(l.weight), ReconstructionConfig(**bad),
                    targets_of(nano()))


def test_factory_must_return_a_learnable_quant():
    with pytest.raises(QuantizationError, match="not a LearnableQuant"):
        reconstruct(nano(), tokens(), lambda n, l: object(), ReconstructionConfig(iters=1), targets_of(nano()))


def test_keep_quants_false_frees_learned_objects():
    result = run(nano(), "block", iters=5, keep_quants=False)
    assert result.quants == {} and len(result.weights) == 14
