"""The one trainer shared by pretraining, fine-tuning and distillation, built on DeepSpeed.

Precision: fp32 master weights and optimizer state always; ``bf16`` only autocasts the
forward. Data order is a pure function of ``(seed, step)``, and checkpoints hold the model,
optimizer, scheduler, RNG states and losses, so a resumed run reproduces the uninterrupted
run bit for bit (CPU, fp32, same thread count). A ``Sampler`` (``components/train/samplers``)
may replace the default order (``BatchOrder``); its state is checkpointed too. Steps are
numbered from 1: "step k" is the k-th optimizer update, ``step-{k:07d}`` is the checkpoint
written after it.

Data parallelism: launched on N ranks (torchrun or the DeepSpeed launcher set RANK and
WORLD_SIZE; ``tasks/train_ranks.py`` does this for a stage with ``resources.ranks``), every
rank draws the same global batch of ``batch_size`` blocks from the sampler and trains on its
own contiguous slice of ``batch_size / N``; DeepSpeed averages the gradients, so a step equals
the one-rank step up to the order of float sums. The logged loss is the mean over ranks. Rank 0
writes checkpoints; under ZeRO each rank adds its optimizer-state shard
(``optimizer-rank{r}.pt``), so a resume needs the same number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from tqdm.auto import tqdm

from components.budget import check_compute
from components.failpoints import failpoint
from components.registry import MethodParams
from components.train.acceleration import (
    attention_implementation,
    compiled_engine,
    cpu_allocator_cache,
    resolve_attention,
    resolve_compile,
    resolve_precision,
    without_kv_cache,
)

if TYPE_CHECKING:
    from components.train.method import TrainingMethod
    from components.train.monitor import ValidationMonitor
    from components.train.samplers.base import Sampler

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{7})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CHECKSUMS_FILE = "checksums.json"  # sha256 and size of every other file, written last
SHARD_FILE = "optimizer-rank{rank}.pt"  # one rank's ZeRO optimizer-state partition
KEEP_CHECKPOINTS = 2

log = logging.getLogger("paperdag.train")


class NonFiniteLossError(RuntimeError):
    """The loss became nan/inf; raised before backward so the weights stay finite."""


def check_patterns_compile(patterns: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    """Validator of a field of regular expressions: each one compiles."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{info.field_name} pattern {pattern!r} is not a regular expression: {e}") from None
    return patterns


class TrainConfig(MethodParams):
    """Training hyperparameters shared by every training method."""

    steps: int = Field(1000, ge=1, description="Number of optimizer updates.")
    batch_size: int = Field(16, ge=1, description="Blocks (sequences) per optimizer update.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from ~0 to `lr` over this many steps.")
    schedule: Literal["cosine", "linear", "constant", "wsd", "infinite"] = Field(
        "cosine", description="After warmup: cosine or linear decay to lr * min_lr_ratio at the last step; a "
        "constant lr; warmup-stable-decay ('wsd': constant, then linear decay over the last `decay_fraction`); "
        "or 'infinite' (Ibrahim et al. 2024): cosine cooldown over `cooldown_steps` to lr * constant_lr_ratio, "
        "constant, then an exponential anneal to lr * min_lr_ratio over the last `anneal_steps` (0: none, "
        "the run ends at the constant lr and a later stage continues from there).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Where the decay ends: lr * min_lr_ratio.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of the post-warmup steps that decays.")
    cooldown_steps: int = Field(0, ge=0, description="infinite: steps of cosine cooldown after warmup.")
    constant_lr_ratio: float = Field(1.0, gt=0, le=1, description="infinite: the constant phase's lr over `lr`.")
    anneal_steps: int = Field(0, ge=0, description="infinite: the last steps, an exponential anneal.")
    optimizer: Literal["adamw", "sgd", "adafactor"] = Field(
        "adamw", description="AdamW (betas 0.9/0.95), SGD with `momentum`, or Adafactor (factored second "
        "moments: state per matrix of rows + columns, not rows x columns; `lr` caps its step relative to each "
        "parameter's RMS, as torch.optim.Adafactor does). A method may supply its own.")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay on >=2-D weights only.")
    lr_drop_at: float | None = Field(None, gt=0, lt=1, description="From this fraction of `steps` on, the "
                                     "schedule's lr is multiplied by `lr_drop_ratio` (Spectra's TriLM schedule "
                                     "lowers its peak at the halfway point, 2.4e-3 to 1.5e-3 for its smallest "
                                     "models); none: no drop.")
    lr_drop_ratio: float = Field(0.5, gt=0, lt=1, description="lr_drop_at: what the lr is multiplied by.")
    weight_decay_off_at: float | None = Field(None, gt=0, lt=1, description="From this fraction of `steps` on, "
                                              "weight decay is 0 (Spectra's TriLM schedule removes it at two thirds); "
                                              "none: it stays on.")
    freeze: tuple[str, ...] = Field((), description="Regular expressions (re.search) over parameter names; "
                                    "matching parameters are not trained: no gradient, no optimizer state.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient L2 norm; 0 disables clipping.")
    on_nonfinite: Literal["error", "stop"] = Field(
        "error", description="A nan/inf loss: 'error' fails the stage; 'stop' ends training at that step and "
        "keeps the weights of the last finite one, recording the step (stability sweeps, where divergence "
        "is the outcome measured).")
    seed: int = Field(0, description="Seeds torch/numpy/python RNGs and the data order.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast where the hardware has bf16 units, else fp32."
    )
    torch_compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model (inductor). 'auto': when the run is long enough "
        "to repay compiling on its device (components/train/acceleration.py).")
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel while training. 'auto': HF eager attention on CPU for short "
        "sequences (faster there), else the model's own. The saved model keeps its own.")
    zero_stage: Literal[0, 1, 2] = Field(0, description="DeepSpeed ZeRO stage (1 partitions optimizer state "
                                         "over ranks, 2 also gradients).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = never).")
    keep_checkpoints: tuple[float, ...] = Field((), description="Also keep the model at these fractions of "
                                                 "`steps` (0 = before the first step) in the artifact, for a checkpoint "
                                                 "sweep (an evaluate stage with `checkpoints: true`).")
    monitor_every: int = Field(0, ge=0, description="Score held-out loss per domain before the first step and "
                               "every N steps, logged as val_loss_<domain> (0 = never; see components/train/monitor.py).")
    monitor_blocks: int = Field(16, ge=1, description="Validation blocks per domain that the monitor scores.")
    log_every: int = Field(10, ge=1, description="Call `on_log` every N steps.")

    @model_validator(mode="after")
    def _kept_checkpoints_are_distinct_steps(self):
        fractions = self.keep_checkpoints
        if any(not 0 <= f < 1 for f in fractions):
            raise ValueError(f"keep_checkpoints must be fractions in [0, 1) (the end is the artifact itself), got "
                             f"{list(fractions)}")
        if list(fractions) != sorted(set(fractions)) or len(set(kept_steps(self).values())) != len(fractions):
            raise ValueError(f"keep_checkpoints {list(fractions)} must be increasing and fall on distinct steps of "
                             f"the {self.steps}")
        return self

    @model_validator(mode="after")
    def _drops_fall_after_warmup(self):
        for key in ("lr_drop_at", "weight_decay_off_at"):
            fraction = getattr(self, key)
            if fraction is not None and not self.warmup_steps <= phase_step(fraction, self.steps) < self.steps:
                raise ValueError(f"{key}={fraction} falls on step {phase_step(fraction, self.steps)} of {self.steps}, "
                                 f"which is not after the {self.warmup_steps} warmup steps and before the end")
        return self

    @model_validator(mode="after")
    def _infinite_phases_fit(self):
        if self.schedule == "infinite":
            phases = self.warmup_steps + self.cooldown_steps + self.anneal_steps
            if phases > self.steps:
                raise ValueError(f"schedule infinite: warmup_steps + cooldown_steps + anneal_steps = {phases} is more "
                                 f"than steps={self.steps}")
            if self.anneal_steps and self.min_lr_ratio > self.constant_lr_ratio:
                raise ValueError(f"schedule infinite: min_lr_ratio={self.min_lr_ratio} is above constant_lr_ratio="
                                 f"{self.constant_lr_ratio}; the anneal goes down")
        return self

    @field_validator("freeze")
    @classmethod
    def _patterns_compile(cls, patterns, info):
        return check_patterns_compile(patterns, info)

    @field_validator("precision", "attention", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _compile_words(cls, value):  # YAML reads on/off as booleans already; accept the strings too
        words = {"auto": "auto", "true": True, "on": True, "false": False, "off": False}
        return words.get(value.lower(), value) if isinstance(value, str) else value


@dataclass
class TrainResult:
    """What one ``train`` call did (counts include steps restored from a checkpoint)."""

    losses: list[float]
    steps: int
    tokens: int
    train_flops: float
    precision: str
    compiled: bool  # torch.compile was used
    attention: str  # attention implementation used while training
    allocator_cache: bool  # freed CPU memory kept in the process heap (cpu_allocator_cache)
    wall_seconds: float  # this call only
    resumed_from_step: int  # 0 when started fresh
    method_facts: dict = field(default_factory=dict)  # method.finalize(model)
    sampler_facts: dict = field(default_factory=dict)  # sampler.facts(steps), keys sampler_*
    trainable_params: int = 0  # elements that trained (after `freeze` and the method's own freezing)
    optimizer_state_bytes: int = 0  # measured from the optimizer's state tensors at the end
    # the part of it held for the decoder blocks' projections (what GaLore projects, what LoRA's
    # adapters and SLTrain's factors replace); embeddings, lm_head and norms excluded
    block_matrix_state_bytes: int = 0
    monitor_history: dict = field(default_factory=dict)  # domain -> [[step, held-out loss]] (monitor_every)
    monitor_facts: dict = field(default_factory=dict)  # per domain: start, peak, peak step, end
    diverged_at_step: int | None = None  # on_nonfinite 'stop': the step whose loss was nan/inf

    @property
    def tokens_per_second(self) -> float:
        """Throughput of this call: the steps it ran (not those restored) over its wall time."""
        ran = self.steps - self.resumed_from_step
        return ran * (self.tokens / max(self.steps, 1)) / max(self.wall_seconds, 1e-9)


def phase_step(fraction: float, steps: int) -> int:
    """The 0-based index of the first update at or after ``fraction`` of ``steps``."""
    return math.ceil(fraction * steps)


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier for the update with 0-based index ``step``: linear warmup, then the
    ``schedule`` from 1 down to ``min_lr_ratio`` at the last step (or constant at 1), times
    ``lr_drop_ratio`` from ``lr_drop_at`` on."""
    factor = _schedule_factor(step, config)
    if config.lr_drop_at is not None and step >= phase_step(config.lr_drop_at, config.steps):
        factor *= config.lr_drop_ratio
    return factor


def weight_decay_factor(step: int, config: TrainConfig) -> float:
    """1, or 0 for the updates from ``weight_decay_off_at`` on."""
    off = config.weight_decay_off_at
    return 0.0 if off is not None and step >= phase_step(off, config.steps) else 1.0


class StageSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``lr_factor`` as a scheduler that also sets each group's weight decay for the next update
    (``weight_decay_factor`` times the group's own), so both follow the step on resume too."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig):
        self.config = config
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
        super().__init__(optimizer, lambda s: lr_factor(s, config))

    def step(self, epoch=None):
        super().step(epoch)
        self.apply_weight_decay()

    def state_dict(self):
        state = super().state_dict()
        del state["config"]  # checkpoints hold tensors and plain values only (loaded weights_only)
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.apply_weight_decay()

    def apply_weight_decay(self) -> None:
        factor = weight_decay_factor(self.last_epoch, self.config)
        for group in self.optimizer.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = group["initial_weight_decay"] * factor


def _schedule_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "infinite":
        return _infinite_factor(step, config)
    decay_steps = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.schedule == "wsd":  # stable at 1, then linear over the last decay_fraction
        stable = 1.0 - config.decay_fraction
        if progress <= stable:
            return 1.0
        progress = (progress - stable) / config.decay_fraction
    if config.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def _infinite_factor(step: int, config: TrainConfig) -> float:
    """After warmup: cosine from 1 to ``constant_lr_ratio`` over ``cooldown_steps``, constant, then
    ``constant * (min / constant) ** fraction`` over the last ``anneal_steps`` (fraction 1/n .. 1)."""
    constant, since_warmup = config.constant_lr_ratio, step - config.warmup_steps
    anneal_start = config.steps - config.anneal_steps
    if step >= anneal_start and config.anneal_steps:
        floor = max(config.min_lr_ratio, 1e-8)  # an exponential never reaches 0
        return constant * (floor / constant) ** ((step - anneal_start + 1) / config.anneal_steps)
    if since_warmup < config.cooldown_steps:
        return constant + (1.0 - constant) * 0.5 * (1.0 + math.cos(math.pi * (since_warmup + 1) / config.cooldown_steps))
    return constant


class BatchOrder:
    """Blocks for each step: position ``g`` of the endless stream is
    ``permutation(seed, epoch=g // n_blocks)[g % n_blocks]``, so the data position is the step."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # only the current and next epochs are ever needed
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        start = step * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        epochs = positions // self.n_blocks
        if epochs[0] == epochs[-1]:
            return self._perm(int(epochs[0]))[positions % self.n_blocks]
        return np.array([self._perm(int(e))[p % self.n_blocks] for e, p in zip(epochs, positions)])


# -- DeepSpeed setup ---------------------------------------------------------------------------


_OWN_DIST_ENV = "PAPERDAG_SINGLE_PROCESS_DIST"


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _skip_shared_memory_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    ``TorchBackend`` builds ``deepspeed_shm_comm`` whenever it creates a process group, but only
    its ``inference_all_reduce`` calls it; training all-reduces through ``torch.distributed``.
    The build costs ~25 s on a fresh machine, and it takes torch's file lock in
    ``torch_extensions``: a process killed while holding it (Ctrl-C, a scheduler's timeout)
    leaves the lock behind, and every later run waits on it forever, silently."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _init_distributed() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _skip_shared_memory_comm_op()

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    # A launcher (deepspeed, torchrun) sets these for every rank. Without one we run a
    # single-process group on a free port; the marker lets a child process of ours tell our
    # inherited values from a launcher's and pick its own port instead of colliding.
    launched = "RANK" in os.environ and os.environ.get(_OWN_DIST_ENV) != "1"
    if not launched:
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_PORT=_free_port())
        os.environ[_OWN_DIST_ENV] = "1"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def end_distributed() -> None:
    """A launched rank's last call: wait for every rank, then tear the process group down.

    Left to interpreter exit, gloo's threads can outlive the group; a rank that finishes first
    (rank 0 saves after the others are done) then died in C++ ("terminate called without an
    active exception", SIGABRT) once in CI. Our own single-process group is kept for reuse.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if os.environ.get(_OWN_DIST_ENV) == "1":
        return
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def freeze_parameters(model: torch.nn.Module, patterns: tuple[str, ...]) -> int:
    """Turn off gradients of the parameters whose name matches a pattern; returns how many
    parameters (elements) still train. Refuses patterns that leave nothing to train."""
    if patterns:
        compiled = [re.compile(p) for p in patterns]
        for name, param in model.named_parameters():
            if any(c.search(name) for c in compiled):
                param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"freeze {list(patterns)} matches every parameter of the model: nothing would train")
    return trainable


def _make_optimizer(model: torch.nn.Module, config: TrainConfig, method) -> torch.optim.Optimizer:
    own = method.optimizer(model, config)  # e.g. GaLore: the method brings its optimizer
    if own is not None:
        return own
    own_groups = method.param_groups(model, config)  # e.g. QFX: binary points at their own rate
    taken = {id(p) for g in own_groups for p in g["params"]}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in taken]}
              for g in _param_groups(model, config.weight_decay)]
    groups = [g for g in groups if g["params"]] + own_groups
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, foreach=True)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr, foreach=True)
    # fused AdamW is one kernel for all params; measured faster than foreach on CPU too
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    """Bytes of the tensors the optimizer keeps (this rank's partition under ZeRO), measured; with
    ``params``, only the state held for those parameters."""
    states = optimizer.state.values() if params is None else [optimizer.state[p] for p in params if p in optimizer.state]
    return sum(v.numel() * v.element_size() for state in states for v in state.values() if isinstance(v, torch.Tensor))


def block_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The trainable parameters of the decoder blocks' projection matrices (``model.layers.*``,
    norms excluded): their weights, or whatever a method trains in their place (LoRA's adapters,
    SLTrain's factors and sparse values)."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and ".layers." in name and "norm" not in name.rsplit(".", 2)[-2]]


# -- checkpoints -------------------------------------------------------------------------------


def _unique_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied aliases (safetensors refuses shared storage): (tensors, alias->kept)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The model's weights as safetensors, tied aliases left out (and recorded in the metadata);
    returns the aliases. Also works on ZeRO-2's flattened parameters, which safetensors'
    ``save_model`` refuses."""
    from safetensors.torch import save_file

    tensors, aliases = _unique_state_dict(model)
    save_file(tensors, str(path), metadata={**(metadata or {}), "tied_aliases": json.dumps(aliases)})
    return aliases


def load_weights(model: torch.nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    """Load what ``save_weights`` wrote; every weight but the tied aliases must be there."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("tied_aliases", "{}"))
    result = model.load_state_dict(load_file(str(path), device=str(device)), strict=False)
    missing = set(result.missing_keys) - set(aliases)
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints, oldest first; tmp dirs and dirs missing a file are ignored."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and all((path / f).is_file() for f in (MODEL_FILE, STATE_FILE, CHECKSUMS_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a file missing or differing from its recorded hash), or None."""
    try:
        recorded = json.loads((path / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS_FILE} is unreadable ({e})"
    if not isinstance(recorded, dict):
        return f"{CHECKSUMS_FILE} is not a mapping"
    for name in (MODEL_FILE, STATE_FILE):
        if not isinstance(recorded.get(name), dict):
            return f"{CHECKSUMS_FILE} has no entry for {name}"
    for name, meta in recorded.items():  # the model, the state and any ZeRO shards
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta.get("bytes") or _sha256(file) != meta.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def latest_intact_checkpoint(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose files match their hashes. A corrupt one is renamed to
    ``corrupt-step-*`` (kept for a look, never resumed from) with a warning naming it, and
    the previous one is tried; None means a fresh start."""
    for step, path in reversed(complete_checkpoints(checkpoint_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return step, path
        aside = path.with_name(f"corrupt-{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(path, aside)
        log.warning("checkpoint %s is corrupt (%s); moved it to %s and falling back to an earlier one",
                    path, problem, aside.name)
    return None


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _save_checkpoint(checkpoint_dir: Path, step: int, model, optimizer, scheduler, losses, method, config,
                     sampler, owner_pid: int, monitor=None) -> None:
    """Rank 0 writes into a temporary directory (named by its pid, ``owner_pid`` on every rank),
    each rank adds its ZeRO shard there, and rank 0 renames it into place once all are in."""
    rank, world = _rank_and_world()
    final = checkpoint_dir / step_dir_name(step)
    tmp = checkpoint_dir / f".tmp-step-{step:07d}-{owner_pid}"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(world)
    try:
        if config.zero_stage > 0:  # each rank holds only its partition of the optimizer state
            torch.save(optimizer.state_dict(), tmp / SHARD_FILE.format(rank=rank))
        _barrier(world)
        if rank == 0:
            _write_checkpoint(tmp, step, model, optimizer, scheduler, losses, method, config, sampler, world, monitor)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: give the space back
        raise
    if rank == 0:
        if final.exists():  # a rerun re-wrote the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in complete_checkpoints(checkpoint_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def _write_checkpoint(tmp: Path, step: int, model, optimizer, scheduler, losses, method, config, sampler,
                      world: int, monitor=None) -> None:
    aliases = save_weights(model, tmp / MODEL_FILE, {"step": str(step)})
    failpoint("checkpoint-write")
    state = {
        "step": step,
        "losses": list(losses),
        "optimizer": optimizer.state_dict() if config.zero_stage == 0 else {},  # else: the shard files
        "world_size": world,
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": _python_rng_state(),
        "numpy_rng": _numpy_rng_state(),
        "method_state": {k: v.detach().to("cpu") for k, v in method.state_tensors().items()},
        "sampler": {"key": sampler.key, "state": sampler.state()},
        "monitor": monitor.state() if monitor is not None else {},
        "tied_aliases": aliases,
        "config": config.model_dump(),
    }
    torch.save(state, tmp / STATE_FILE)
    checksums = {file.name: {"bytes": file.stat().st_size, "sha256": _sha256(file)} for file in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums))


def _load_checkpoint(path: Path, model, device) -> dict:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    load_weights(model, path / MODEL_FILE, device)
    return state


def _load_optimizer_shards(path: Path, ds_optimizer, world: int) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # A ZeRO partition's state holds three plain DeepSpeed classes besides tensors: allow exactly those.
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        shards = [torch.load(path / SHARD_FILE.format(rank=r), map_location="cpu", weights_only=True)
                  for r in range(world)]
    # DeepSpeed takes every rank's state and picks its own by data-parallel rank
    ds_optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)


def kept_steps(config: "TrainConfig") -> dict[float, int]:
    """The step each ``keep_checkpoints`` fraction falls on (0: before the first step)."""
    return {f: round(f * config.steps) for f in config.keep_checkpoints}


def step_dir_name(step: int) -> str:
    """The directory of the checkpoint of ``step``: a resume checkpoint, or one kept for a sweep."""
    return f"step-{step:07d}"


KEPT_DIR = "keep"  # inside the resume checkpoint directory, so a resumed run still has the earlier ones


def _keep_checkpoint(checkpoint_dir: Path, step: int, model) -> None:
    """Rank 0 writes the model's weights at ``step`` to ``<checkpoint_dir>/keep/step-N/`` (whole or not at all)."""
    if _rank_and_world()[0] != 0:
        return
    final = checkpoint_dir / KEPT_DIR / step_dir_name(step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / MODEL_FILE, {"step": str(step)})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _check_resume_config(state: dict, config: TrainConfig, path: Path, world: int) -> None:
    saved = state["config"]
    for key in ("batch_size", "seed"):  # these change the data order: resuming would be wrong
        if saved[key] != getattr(config, key):
            raise ValueError(f"checkpoint {path} was written with {key}={saved[key]}, config has {getattr(config, key)}")
    saved_world = state.get("world_size", 1)
    if config.zero_stage > 0 and saved_world != world:
        raise ValueError(f"checkpoint {path} holds ZeRO-{config.zero_stage} optimizer shards of {saved_world} "
                         f"rank(s), but this run has {world}; resume with {saved_world}, or delete {path.parent} "
                         "to start over")


def _restore_sampler(state: dict, sampler: "Sampler", path: Path) -> None:
    saved = state.get("sampler", {"key": "uniform", "state": {}})  # written before samplers existed
    if saved["key"] != sampler.key:
        raise ValueError(f"checkpoint {path} was written with sampler {saved['key']!r}, this run uses {sampler.key!r}")
    sampler.load_state(saved["state"])


def _default_sampler(n_blocks: int, config: TrainConfig) -> "Sampler":
    from components.train.samplers.uniform import UniformSampler  # here: uniform imports this module

    sampler = UniformSampler()
    sampler.bind(n_blocks, config.batch_size, config.seed)
    return sampler


def _check_sampler(sampler: "Sampler", n_blocks: int, config: TrainConfig) -> None:
    bound = (getattr(sampler, "n_blocks", None), getattr(sampler, "batch_size", None), getattr(sampler, "seed", None))
    if bound != (n_blocks, config.batch_size, config.seed):
        raise ValueError(f"sampler {sampler.key!r} is bound to (n_blocks, batch_size, seed) = {bound} but training "
                         f"uses {(n_blocks, config.batch_size, config.seed)}; call sampler.bind(...) with those")


# -- the loop ----------------------------------------------------------------------------------


def _validate_blocks(blocks: np.ndarray, model) -> None:
    if not isinstance(blocks, np.ndarray) or blocks.ndim != 2 or not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"blocks must be a 2-D integer numpy array (n_blocks, seq_len), got {type(blocks).__name__} "
                         f"{getattr(blocks, 'shape', '')} {getattr(blocks, 'dtype', '')}")
    if blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks has shape {blocks.shape}: need at least 1 block of at least 2 tokens")
    vocab = model.get_output_embeddings().out_features
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"blocks hold token ids in [{low}, {high}] but the model vocabulary has {vocab} entries")


def train(
    model: torch.nn.Module,
    blocks: np.ndarray,
    config: TrainConfig,
    method: "TrainingMethod",
    *,
    teacher: torch.nn.Module | None = None,
    checkpoint_dir: Path | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    stop_after_step: int | None = None,
    sampler: "Sampler | None" = None,
    monitor: "ValidationMonitor | None" = None,
) -> TrainResult:
    """Train ``model`` in place on ``blocks`` (n_blocks, seq_len) with ``method``.

    With ``checkpoint_dir``, resumes from its latest complete checkpoint. ``stop_after_step``
    ends the call after that step (and its checkpoint, if due), as an interruption would.
    ``sampler`` (already ``bind``-ed to ``len(blocks)``, ``config.batch_size`` and ``config.seed``)
    picks each step's blocks; None is the uniform ``BatchOrder``. Its metrics go to ``on_log``, as
    do a ``monitor``'s held-out losses (``components/train/monitor.py``).
    """
    import deepspeed

    start_time = time.perf_counter()
    _validate_blocks(blocks, model)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method {method.key!r} needs a teacher model, got teacher=None")
    if sampler is None:
        sampler = _default_sampler(blocks.shape[0], config)
    _check_sampler(sampler, blocks.shape[0], config)
    precision = resolve_precision(config.precision)
    _init_distributed()
    rank, world = _rank_and_world()
    if world > 1:
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} does not split over {world} ranks; choose a "
                             f"batch_size divisible by the rank count")
        if not method.shards_across_ranks:
            raise ValueError(f"method {method.key!r} keeps per-block state that each rank would update for its "
                             f"own blocks only; train it on one rank")
        on_log = on_log if rank == 0 else None
        progress = progress and rank == 0
    owner = [os.getpid()]  # names checkpoint temp dirs on every rank
    if world > 1:
        torch.distributed.broadcast_object_list(owner, src=0)
    micro_batch = config.batch_size // world
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    model.to(device)
    model.train()
    if teacher is not None:
        teacher.to(device)
        teacher.eval()
        teacher.requires_grad_(False)
    plain_keys = set(model.state_dict()) if config.keep_checkpoints else set()
    method.use_blocks(blocks)
    method.prepare(model)
    method.bind(model, teacher, blocks.shape[0])
    trainable = freeze_parameters(model, config.freeze)
    keep = {step: f for f, step in kept_steps(config).items()}
    if keep and checkpoint_dir is None:
        raise ValueError("keep_checkpoints needs a checkpoint_dir to keep them in")
    if keep and set(model.state_dict()) != plain_keys:
        raise ValueError(f"keep_checkpoints keeps the plain model's weights, but method {method.key!r} trains "
                         f"through modules of its own (they fold back only at the end); drop keep_checkpoints")

    optimizer = _make_optimizer(model, config, method)
    matrices = block_matrices(model)  # before finalize, which may swap modules (LoRA merges its adapters)
    scheduler = StageSchedule(optimizer, config)

    losses: list[float] = []
    start_step = 0
    diverged_at_step: int | None = None
    latest = None
    for turn in (0, 1):  # rank 0 cleans up and sets corrupt checkpoints aside; the others then read
        if (rank == 0) == (turn == 0) and checkpoint_dir is not None:
            if rank == 0 and checkpoint_dir.is_dir():
                for stale in checkpoint_dir.glob(".tmp-step-*"):  # a crash mid-write leaves these behind
                    shutil.rmtree(stale, ignore_errors=True)
            latest = latest_intact_checkpoint(checkpoint_dir)
        _barrier(world)
    if checkpoint_dir is not None and latest is None and any(checkpoint_dir.glob("corrupt-step-*")):
        log.warning("no intact checkpoint left in %s; training starts again from step 0", checkpoint_dir)
    state = None
    if latest:
        start_step, path = latest
        state = _load_checkpoint(path, model, device)
        _check_resume_config(state, config, path, world)
        _restore_sampler(state, sampler, path)
        if monitor is not None:
            monitor.load_state(state.get("monitor", {}))
        method.load_state_tensors({k: v.to(device) for k, v in state["method_state"].items()})
        if config.zero_stage == 0:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        losses = [float(x) for x in state["losses"]]

    seq_len = blocks.shape[1]
    tokens_per_step = config.batch_size * seq_len
    flops_per_token = method.flops_per_token(model, seq_len, teacher=teacher)
    check_compute(flops_per_token * tokens_per_step * (config.steps - start_step), device.type,
                  f"training {method.key} for {config.steps - start_step:,} steps of {tokens_per_step:,} tokens")

    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": config.zero_stage},
        # ZeRO partitions gradients, so only DeepSpeed can clip them; at stage 0 one foreach
        # clip_grad_norm_ is cheaper than DeepSpeed's per-parameter loop plus an all-reduce
        "gradient_clipping": config.grad_clip if config.zero_stage > 0 else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed switches autocast *off* inside engine.forward unless this section enables
        # it, which silently ran bf16 "mixed precision" in fp32 (seen on an H200: 2.7x slower
        # than a bare autocast loop). Weights and optimizer state stay fp32 either way.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
    }
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if config.zero_stage == 0 and torch.distributed.get_world_size() == 1:
        engine.enable_backward_allreduce = False  # one process: the gradient all-reduce is a pure copy
    clip_params = [p for p in model.parameters() if p.requires_grad] if config.zero_stage == 0 and config.grad_clip else None
    if state is not None:
        if config.zero_stage > 0:
            _load_optimizer_shards(latest[1], ds_optimizer, world)
        _restore_rng(state)  # last: DeepSpeed init must not shift the restored streams

    compiled = resolve_compile(config.torch_compile, device, flops_per_token * tokens_per_step * config.steps)
    attention = resolve_attention(config.attention, model, device, seq_len, compiled)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    last_step = config.steps if stop_after_step is None else min(config.steps, stop_after_step)
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc=f"train {method.key}", unit="step")
    log_time, log_step = time.perf_counter(), start_step
    models = [model] + ([teacher] if teacher is not None else [])
    try:
        with (attention_implementation(models, attention), without_kv_cache(models),
              compiled_engine(engine, model, compiled),
              cpu_allocator_cache(device) as allocator_cache):
            if start_step == 0 and 0 in keep:
                _keep_checkpoint(checkpoint_dir, 0, model)
            if start_step == 0:  # e.g. Skill-it measures the untrained model's per-skill loss
                first = sampler.observe(0, model, autocast)
                if monitor is not None:
                    first = {**first, **monitor.observe(0, model, autocast)}
                if first and on_log is not None:
                    on_log(0, first)
            for index in range(start_step, last_step):
                step = index + 1
                batch_indices = sampler.indices(index)
                if world > 1:  # every rank draws the global batch and trains on its own slice
                    batch_indices = batch_indices[rank * micro_batch:(rank + 1) * micro_batch]
                batch = torch.from_numpy(blocks[batch_indices].astype(np.int64)).to(device, non_blocking=True)
                method.on_batch(step, batch_indices)
                nonfinite = None
                try:
                    with autocast:
                        loss = method.loss(engine, batch, teacher)
                    if world > 1:
                        mean = loss.detach().clone()
                        torch.distributed.all_reduce(mean)
                        value = mean.item() / world
                    else:
                        value = loss.item()  # the one sync per step; checked before backward so weights stay finite
                    if math.isfinite(value):
                        engine.backward(loss)
                    else:
                        nonfinite = f"non-finite loss ({value}) at step {step}"
                except FloatingPointError as error:  # e.g. an emulated low-precision GEMM met inf/nan (names its layer)
                    nonfinite = f"{error}, at step {step}"
                if nonfinite is not None:  # no optimizer step has seen it: the weights are the last finite ones
                    if config.on_nonfinite == "error" or not losses:
                        raise NonFiniteLossError(nonfinite if config.on_nonfinite == "error" else
                                                 f"{nonfinite}: on_nonfinite 'stop', but no step finished to keep")
                    diverged_at_step = step
                    break
                if clip_params is not None:
                    torch.nn.utils.clip_grad_norm_(clip_params, config.grad_clip, foreach=True)
                engine.step()
                method.after_step(model)
                sampler_metrics = sampler.observe(step, model, autocast)
                if monitor is not None:
                    sampler_metrics = {**sampler_metrics, **monitor.observe(step, model, autocast)}
                losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if on_log is not None and step % config.log_every == 0:
                    now = time.perf_counter()
                    rate = (step - log_step) * tokens_per_step / max(now - log_time, 1e-9)
                    on_log(step, {"loss": value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate})
                    log_time, log_step = time.perf_counter(), step
                if sampler_metrics and on_log is not None:
                    on_log(step, sampler_metrics)
                if step in keep:  # before the resume checkpoint: a crash between the two loses neither
                    _keep_checkpoint(checkpoint_dir, step, model)
                if checkpoint_dir is not None and config.checkpoint_every and (
                    step % config.checkpoint_every == 0 or step == config.steps
                ):
                    _save_checkpoint(checkpoint_dir, step, model, ds_optimizer, scheduler, losses, method, config,
                                     sampler, owner[0], monitor)
    finally:
        bar.close()
        engine.destroy() if hasattr(engine, "destroy") else None

    steps_done = len(losses)
    return TrainResult(
        losses=losses,
        steps=steps_done,
        tokens=steps_done * tokens_per_step,
        train_flops=float(flops_per_token * steps_done * tokens_per_step),
        precision=precision,
        compiled=compiled,
        attention=attention,
        allocator_cache=allocator_cache,
        wall_seconds=time.perf_counter() - start_time,
        resumed_from_step=start_step,
        method_facts=method.finalize(model),
        sampler_facts=sampler.facts(steps_done),
        monitor_history=monitor.history if monitor is not None else {},
        monitor_facts=monitor.facts() if monitor is not None else {},
        diverged_at_step=diverged_at_step,
        trainable_params=trainable,
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        block_matrix_state_bytes=optimizer_state_bytes(optimizer, matrices),
    )
