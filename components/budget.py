"""Refuse work this machine cannot finish, before it starts.

``steps: 1000000000000`` once started a 270-million-hour run, and ``vocab_size: 1000000000``
aborted inside the tokenizer's Rust code asking for 71 GB. Both are typos as often as
intentions, so they are refused with a message that says what they would cost:
- compute: a training run's FLOPs divided by an *optimistic* peak rate of the device is a
  lower bound on its time; above ``PAPERDAG_MAX_STAGE_HOURS`` (default 168, a week) it is
  refused. Real runs reach 10-60% of these peaks, so no honest run is refused by mistake
  unless it would take days anyway;
- memory: a tokenizer's training tables (about 72 bytes per vocabulary entry, from that
  abort) above the memory available now.

``paperdag run --allow-over-budget`` (``PAPERDAG_ALLOW_OVER_BUDGET=1``) runs them anyway.
"""
from __future__ import annotations

import os

ALLOW_ENV = "PAPERDAG_ALLOW_OVER_BUDGET"
MAX_HOURS_ENV = "PAPERDAG_MAX_STAGE_HOURS"
DEFAULT_MAX_HOURS = 168.0
# Optimistic peaks (dense bf16 matmul): an AMX Xeon core ~0.5 TFLOP/s measured here, doubled;
# an H200 ~1 PFLOP/s, doubled.
PEAK_FLOPS_PER_CPU_CORE = 1e12
PEAK_FLOPS_PER_GPU = 2e15
BPE_BYTES_PER_VOCAB_ENTRY = 72


class BudgetError(ValueError):
    """A stage would take longer or need more memory than this machine has to give."""


def _allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").lower() in ("1", "true", "yes")


def _override_hint() -> str:
    return f"pass --allow-over-budget (or set {ALLOW_ENV}=1) to run it anyway"


def peak_flops_per_second(device_type: str) -> float:
    if device_type == "cuda":
        import torch

        return PEAK_FLOPS_PER_GPU * max(torch.cuda.device_count(), 1)
    return PEAK_FLOPS_PER_CPU_CORE * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                                      (os.cpu_count() or 1))


def _human(seconds: float) -> str:
    for unit, size in (("years", 3.15e7), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.3g} {unit}"
    return f"{seconds:.3g} s"


def check_compute(flops: float, device_type: str, what: str) -> None:
    """Raise BudgetError if even the optimistic time for ``flops`` exceeds the stage limit."""
    limit_hours = float(os.environ.get(MAX_HOURS_ENV, DEFAULT_MAX_HOURS))
    peak = peak_flops_per_second(device_type)
    seconds = flops / peak
    if seconds > limit_hours * 3600 and not _allowed():
        raise BudgetError(
            f"{what} would take at least {_human(seconds)} on this machine ({flops:.3g} FLOPs at an optimistic "
            f"{peak:.3g} FLOP/s on {device_type}), beyond the {limit_hours:g}-hour limit ({MAX_HOURS_ENV}); "
            f"lower the steps, or {_override_hint()}")


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(need_bytes: float, what: str) -> None:
    have = available_memory_bytes()
    if need_bytes > have and not _allowed():
        raise BudgetError(f"{what} needs about {need_bytes / 1e9:,.1f} GB of memory; {have / 1e9:,.1f} GB is available; "
                          f"{_override_hint()}")
