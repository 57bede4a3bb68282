"""How the shared trainer runs on the hardware it finds: precision, torch.compile, attention kernel.

Each choice is ``auto`` by default and can be forced from a recipe. ``auto`` follows rules
measured on the hardware named below (numbers in benchmarks/RESULTS.md, "CPU training
throughput"); the choice made is recorded in the model's metadata and as MLflow tags.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterator

import torch


def is_model_attention(name: str) -> bool:
    """The attentions this project registers (Hedgehog's linear, BiPFT's binary) are part of the
    model, trained with it, not a choice of kernel."""
    return name.startswith("paperdag_")


# Cold inductor compile of the micro model (5.3M params, batch 16 x 256) takes ~33 s on 2 CPU
# cores and saves ~0.16 s of ~0.59 s per bf16 step: it repays itself after ~200 steps, ~2.2e13
# training FLOPs. Below this budget, eager mode finishes first.
CPU_COMPILE_MIN_TRAIN_FLOPS = 3e13
# On an H200 (torch 2.11, `small` preset, batch 16 x 512; two runs) compiling took 31-35 s and cut
# the step time 1.87-2.08x (0.050 -> 0.027 s, 0.068 -> 0.033 s): repaid after ~1000-1300 steps,
# 5.6e15-7.4e15 training FLOPs.
CUDA_COMPILE_MIN_TRAIN_FLOPS = 1e16
# HF's eager attention (matmul + softmax) beat the SDPA flash kernel on CPU for short sequences
# (seq 128-256: 3-15% per step under bf16 autocast; seq 512: 5% only when compiled) and lost
# above (seq 1024: 1.9x slower in eager mode), where its seq^2 score tensors also cost memory.
CPU_EAGER_ATTENTION_MAX_SEQ = 256
CPU_EAGER_ATTENTION_MAX_SEQ_COMPILED = 512
# glibc mallopt(3) parameters and their documented defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_DEFAULT_TRIM_THRESHOLD, GLIBC_DEFAULT_MMAP_MAX = 128 * 1024, 65536
CPU_ALLOCATOR_ENV = "PAPERDAG_CPU_ALLOCATOR"  # "cache" (default) or "system"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(requested: str) -> str:
    """'fp32' or 'bf16'. 'auto' picks bf16 on a bf16-capable CUDA GPU or a CPU with
    avx512_bf16/amx_bf16 (where bf16 autocast is actually faster), else fp32."""
    requested = requested.lower()
    if requested in ("fp32", "bf16"):
        return requested
    if requested != "auto":
        raise ValueError(f"precision {requested!r} is not one of 'auto', 'fp32', 'bf16'")
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if {"avx512_bf16", "amx_bf16"} & _cpu_flags():
        return "bf16"
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX512_BF16"?
    return "bf16" if ("BF16" in capability.upper() or "AMX" in capability.upper()) else "fp32"


def resolve_compile(requested: bool | str, device: torch.device, train_flops: float) -> bool:
    """Whether to ``torch.compile`` the model for this run. 'auto' compiles once the run's training
    FLOPs repay a cold compile on this kind of device (CPU or CUDA; others stay eager)."""
    if isinstance(requested, bool):
        return requested
    if requested != "auto":
        raise ValueError(f"torch_compile {requested!r} is not one of 'auto', true, false")
    minimum = {"cpu": CPU_COMPILE_MIN_TRAIN_FLOPS, "cuda": CUDA_COMPILE_MIN_TRAIN_FLOPS}.get(device.type)
    return minimum is not None and train_flops >= minimum


def resolve_attention(requested: str, model: torch.nn.Module, device: torch.device, seq_len: int,
                      compiled: bool) -> str:
    """The attention implementation to train with. 'auto' keeps the model's own, except on CPU for
    short sequences, where HF's 'eager' attention is faster than SDPA (see the limits above)."""
    if requested in ("sdpa", "eager"):
        return requested
    if requested != "auto":
        raise ValueError(f"attention {requested!r} is not one of 'auto', 'sdpa', 'eager'")
    own = current_attention(model)
    if device.type != "cpu" or own not in ("sdpa", "eager"):
        return own
    limit = CPU_EAGER_ATTENTION_MAX_SEQ_COMPILED if compiled else CPU_EAGER_ATTENTION_MAX_SEQ
    return "eager" if seq_len <= limit else own


def current_attention(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "unknown")


@contextlib.contextmanager
def attention_implementation(models: list[torch.nn.Module], name: str) -> Iterator[None]:
    """Run the block with ``name`` attention in every model, then put each model's own back, so the
    saved config (and every later use of the model) is unchanged. A model with linear or binary
    attention keeps it: there it is part of the model, not a choice of kernel."""
    if is_model_attention(name):  # resolve_attention keeps such a model's own: nothing to switch
        yield
        return
    previous = [(model, current_attention(model)) for model in models if not is_model_attention(current_attention(model))]
    changed = []
    try:
        for model, own in previous:
            if own == name:
                continue
            if not hasattr(model, "set_attn_implementation"):
                raise ValueError(f"attention={name!r}: {type(model).__name__} cannot switch its attention "
                                 f"implementation (it uses {own!r}); set attention: auto")
            model.set_attn_implementation(name)
            changed.append((model, own))
        yield
    finally:
        for model, own in changed:
            model.set_attn_implementation(own)


@contextlib.contextmanager
def without_kv_cache(models: list[torch.nn.Module]) -> Iterator[None]:
    """Run the block with ``config.use_cache`` off in every model, then put each value back (the saved
    config keeps it). A training forward has no use for a KV cache, and with one HF builds a
    ``DynamicCache`` of every layer's keys and values at every step (about 5% of a micro step on a
    2-core CPU, eager fp32). ``generate`` reads its own generation config, so sampling inside
    training still caches."""
    previous = [(model.config, model.config.use_cache) for model in models if hasattr(model, "config")
                and hasattr(model.config, "use_cache")]
    try:
        for config, _ in previous:
            config.use_cache = False
        yield
    finally:
        for config, value in previous:
            config.use_cache = value


@contextlib.contextmanager
def compiled_engine(engine, model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """``engine.compile()`` (DeepSpeed's torch.compile of the module, inductor backend) for the
    block; afterwards the plain model runs eagerly again, as evaluation and export expect."""
    if not enabled:
        yield
        return
    # Inductor lowers the embedding backward (index_put with accumulate) to parallel atomic adds,
    # so two compiled runs from one seed drifted apart after a few steps (1e-7, then growing).
    # In deterministic mode it keeps the eager, ordered kernel: runs and resumes are bit-identical
    # again. Scoped to the compiled run; empty tensors are not NaN-filled (that costs time).
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        engine.compile()
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        # nn.Module.compile() stores the compiled forward here; None is its uncompiled state
        # (checked by tests/components/train/test_acceleration.py, which fails if torch changes it).
        model._compiled_call_impl = None


@contextlib.contextmanager
def eager(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` uncompiled inside a ``compiled_engine`` block, e.g. to generate text mid-training:
    every new generation length would otherwise recompile the forward."""
    compiled = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError off glibc (musl, macOS)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def cpu_allocator_cache(device: torch.device) -> Iterator[bool]:
    """While training on CPU, keep freed memory in the process heap instead of handing it back to
    the OS. glibc serves blocks over 32 MB (logits, their gradients) with fresh mmaps and trims the
    heap top on free, so every step page-faulted those tensors in again: measured 0.47 vs 0.38 s per
    compiled bf16 step of the micro model (and 0.85 vs 0.80 s for a bare fp32 loop). This is what
    PyTorch's CUDA caching allocator does on GPUs. Yields whether it applied (glibc, CPU, and
    ``PAPERDAG_CPU_ALLOCATOR`` not ``system``); glibc's defaults come back afterwards."""
    choice = os.environ.get(CPU_ALLOCATOR_ENV, "cache").lower()
    if choice not in ("cache", "system"):
        raise ValueError(f"{CPU_ALLOCATOR_ENV}={choice!r} is not one of 'cache', 'system'")
    libc = _glibc() if device.type == "cpu" and choice == "cache" else None
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int; larger than any heap top we free
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD)
