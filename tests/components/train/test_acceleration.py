"""The trainer's hardware choices: torch.compile and the attention kernel (precision: test_trainer)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError

os.environ["HF_HUB_OFFLINE"] = "1"

from components.model.presets import build_model  # noqa: E402
from components.train.acceleration import (  # noqa: E402
    CPU_COMPILE_MIN_TRAIN_FLOPS,
    CUDA_COMPILE_MIN_TRAIN_FLOPS,
    CPU_ALLOCATOR_ENV,
    attention_implementation,
    cpu_allocator_cache,
    resolve_attention,
    resolve_compile,
)
from components.train.dense import DenseTraining  # noqa: E402
from components.train.spdf import SpdfTraining  # noqa: E402
from components.train.trainer import TrainConfig, train  # noqa: E402

VOCAB, SEQ = 64, 16
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def pattern_blocks(n: int = 64) -> np.ndarray:
    starts = np.random.default_rng(0).integers(0, VOCAB, size=(n, 1))
    return ((starts + np.arange(SEQ)) % VOCAB).astype(np.int32)


def nano(seed: int = 0):
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed)


def dense(**overrides):
    params = dict(steps=10, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32", log_every=1)
    config = DenseTraining.Params(**{**params, **overrides})
    return config, DenseTraining(config)


def test_compile_rule():
    assert resolve_compile(True, CUDA, 0.0) is True
    assert resolve_compile(False, CPU, 1e20) is False
    assert resolve_compile("auto", CPU, CPU_COMPILE_MIN_TRAIN_FLOPS) is True
    assert resolve_compile("auto", CPU, CPU_COMPILE_MIN_TRAIN_FLOPS * 0.99) is False
    assert resolve_compile("auto", CUDA, CPU_COMPILE_MIN_TRAIN_FLOPS) is False  # a GPU gets there far sooner
    assert resolve_compile("auto", CUDA, CUDA_COMPILE_MIN_TRAIN_FLOPS) is True
    assert resolve_compile("auto", torch.device("meta"), 1e30) is False  # never measured: eager
    with pytest.raises(ValueError, match="'sometimes'"):
        resolve_compile("sometimes", CPU, 0.0)


def test_attention_rule():
    model = nano()
    assert model.config._attn_implementation == "sdpa"
    assert resolve_attention("auto", model, CPU, 256, compiled=False) == "eager"
    assert resolve_attention("auto", model, CPU, 512, compiled=False) == "sdpa"
    assert resolve_attention("auto", model, CPU, 512, compiled=True) == "eager"
    assert resolve_attention("auto", model, CPU, 1024, compiled=True) == "sdpa"
    assert resolve_attention("auto", model, CUDA, 128, compiled=True) == "sdpa"  # flash kernels win there
    assert resolve_attention("sdpa", model, CPU, 16, compiled=False) == "sdpa"
    with pytest.raises(ValueError, match="'flash'"):
        resolve_attention("flash", model, CPU, 16, compiled=False)


def test_config_accepts_yaml_words_and_rejects_others():
    assert TrainConfig(torch_compile="on").torch_compile is True
    assert TrainConfig(torch_compile="OFF").torch_compile is False
    assert TrainConfig(torch_compile=True).torch_compile is True
    assert TrainConfig().torch_compile == "auto" and TrainConfig().attention == "auto"
    assert TrainConfig(attention="EAGER").attention == "eager"
    with pytest.raises(ValidationError, match=r"torch_compile.bool\n  Input should be a valid boolean.*'sometimes'"):
        TrainConfig(torch_compile="sometimes")
    with pytest.raises(ValidationError, match=r"attention\n  Input should be 'auto', 'sdpa' or 'eager'"):
        TrainConfig(attention="flash")


def test_attention_switch_is_undone_on_error():
    model = nano()
    with pytest.raises(RuntimeError, match="boom"):
        with attention_implementation([model], "eager"):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_attention_train_alike_and_the_model_keeps_its_own():
    losses = {}
    for attention in ("sdpa", "eager"):
        config, method = dense(attention=attention)
        model = nano()
        result = train(model, pattern_blocks(), config, method, progress=False)
        assert result.attention == attention and result.compiled is False
        assert model.config._attn_implementation == "sdpa"  # what gets saved is unchanged
        losses[attention] = result.losses
    # the same math in another kernel: fp32 rounding differences only
    np.testing.assert_allclose(losses["eager"], losses["sdpa"], rtol=1e-4)


def test_compiled_training_matches_eager_and_resumes_bit_identically(tmp_path):
    config, method = dense(torch_compile=False)
    eager = train(nano(), pattern_blocks(), config, method, progress=False)

    config, method = dense(torch_compile=True, checkpoint_every=4)
    straight_model = nano()
    straight = train(straight_model, pattern_blocks(), config, method, checkpoint_dir=tmp_path / "a", progress=False)
    assert straight.compiled is True
    # inductor fuses and reorders fp32 arithmetic: close to eager, not equal
    np.testing.assert_allclose(straight.losses, eager.losses, rtol=1e-4)
    # afterwards the model runs eagerly again (evaluation, export): nn.Module.compile() is undone
    assert straight_model._compiled_call_impl is None
    assert not torch.are_deterministic_algorithms_enabled()  # the deterministic mode was scoped to the run

    train(nano(), pattern_blocks(), config, method, checkpoint_dir=tmp_path / "b", progress=False, stop_after_step=4)
    resumed_model = nano()
    resumed = train(resumed_model, pattern_blocks(), config, DenseTraining(config), checkpoint_dir=tmp_path / "b",
                    progress=False)
    assert resumed.resumed_from_step == 4
    assert resumed.losses == straight.losses
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


def test_spdf_masks_hold_under_compiled_bf16():
    config = SpdfTraining.Params(steps=10, batch_size=8, lr=1e-2, warmup_steps=2, precision="bf16",
                                 torch_compile=True, sparsity=0.75, mask_seed=3)
    method = SpdfTraining(config)
    model = nano()
    result = train(model, pattern_blocks(), config, method, progress=False)
    assert result.compiled and result.precision == "bf16"
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert result.method_facts["density"] == pytest.approx(0.25, abs=0.01)
    for name, module in model.named_modules():
        if name in method.masks:
            assert torch.count_nonzero(module.weight[~method.masks[name]]) == 0, name


# Measured in a fresh interpreter: in a pytest worker that trained before, a 256 MiB request can
# be served from a hole that earlier training left in the heap, and its free then keeps the pages
# whatever the allocator settings are (the check failed that way, depending on test order).
_KEPT_AFTER_FREE = """
import os, sys, torch
from components.train.acceleration import CPU_ALLOCATOR_ENV, cpu_allocator_cache

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def kept_after_free(mb=256):
    block = torch.ones(mb * 2**18)  # mb MiB of fp32, touched
    held = rss()
    del block
    return mb * 2**20 - (held - rss())  # read right around the free

os.environ[CPU_ALLOCATOR_ENV] = sys.argv[1]
with cpu_allocator_cache(torch.device("cpu")) as applied:
    print(int(applied), kept_after_free())
"""


def _kept_after_free(allocator: str) -> tuple[bool, int]:
    """(whether the cache applied, bytes of a freed 256 MiB block the process keeps)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", _KEPT_AFTER_FREE, allocator], cwd=root, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)}).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_cpu_allocator_cache_keeps_freed_memory_in_the_process(monkeypatch):
    applied, kept = _kept_after_free("system")
    assert not applied and kept < 64 * 2**20  # glibc hands a 256 MiB block straight back
    applied, kept = _kept_after_free("cache")
    assert applied and kept > 200 * 2**20  # freed, but kept for the next step
    with cpu_allocator_cache(CUDA) as applied:
        assert not applied
    monkeypatch.setenv(CPU_ALLOCATOR_ENV, "bogus")
    with pytest.raises(ValueError, match="PAPERDAG_CPU_ALLOCATOR='bogus'"):
        with cpu_allocator_cache(CPU):
            pass


def test_eager_runs_a_compiled_model_uncompiled_and_restores_its_compiled_forward():
    from components.train.acceleration import eager

    graphs = []

    def counting_backend(graph_module, example_inputs):  # counts what dynamo compiles, runs it as traced
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0).eval()
    model.compile(backend=counting_backend)
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        compiled_logits = model(input_ids=ids).logits
        assert len(graphs) >= 1
        seen = len(graphs)
        with eager(model):
            for length in (3, 5, 7):  # every new length would make dynamo trace again
                eager_logits = model(input_ids=ids[:, :length]).logits
            assert len(graphs) == seen
        torch.testing.assert_close(eager_logits, compiled_logits[:, :7])
        model(input_ids=ids)  # compiled again afterwards: the cached graph, no new trace
    assert model._compiled_call_impl is not None and len(graphs) == seen
    torch._dynamo.reset()
