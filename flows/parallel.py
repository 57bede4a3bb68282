"""Independent stages side by side, on a Prefect task runner.

``paperdag run --max-parallel N`` submits every stage whose upstream stages (in this run) have
finished, at most N at a time, to one of Prefect's task runners:

- ``process`` (default): Prefect's ``ProcessPoolTaskRunner``, N worker processes on this machine;
- ``dask`` or ``dask:ADDRESS``: ``prefect-dask``'s ``DaskTaskRunner`` on a new ``LocalCluster`` of
  N single-threaded worker processes, or on the scheduler at ADDRESS;
- ``ray`` or ``ray:ADDRESS``: ``prefect-ray``'s ``RayTaskRunner`` on a local Ray or at ADDRESS.

Processes rather than threads, because a stage seeds torch's global RNG and sets its
intra-op thread count: two stages in one process would draw from one RNG stream.

Cores are shared out, not oversubscribed: each local worker process runs torch with
``cores // N`` threads, so two training stages on 2 cores take one core each. A stage that
declares ``resources`` (threads, memory_gb, gpus; ranks, see tasks/train_ranks.py) runs with its own thread count and starts
only while the stages running beside it leave that much of the machine free (``StagePacker``).
A stage whose artifact is already in the store is served in the flow's own process (a cache
hit is a stat and a checksum, not worth a worker). The digest lock in ``ArtifactStore.lock`` keeps two
stages, or two ``paperdag run``s on one workspace, from building one digest at once.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

RUNNERS = ("process", "dask", "ray")


class RunnerError(ValueError):
    """A ``--runner`` spec that names no runner, or a runner whose package is missing."""


def default_max_parallel() -> int:
    """One stage per two cores: every stage keeps at least two torch threads (1 on this 2-core laptop)."""
    return max(1, (os.cpu_count() or 1) // 2)


def threads_per_stage(max_parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // max_parallel)


class ResourcesError(RunnerError):
    """A stage asks for more threads, memory or GPUs than the machine has."""


@dataclass(frozen=True)
class Capacity:
    """What the machine that runs the stages has."""

    cores: float  # counts; infinite for a cluster at an address
    memory_gb: float
    gpus: float

    @classmethod
    def local(cls) -> "Capacity":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        gpus = len(list(Path("/dev").glob("nvidia[0-9]*")))  # without importing torch (seconds)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # as CUDA reads it: the listed devices, up to the first invalid entry
            listed = 0
            for entry in visible.split(","):
                if not entry.strip() or entry.strip().startswith("-"):
                    break
                listed += 1
            gpus = min(gpus, listed)
        return cls(os.cpu_count() or 1, memory, gpus)

    @classmethod
    def unbounded(cls) -> "Capacity":
        """A cluster at an address: it has what it has, and places stages itself."""
        return cls(math.inf, math.inf, math.inf)

    def limits(self) -> dict[str, float]:
        """By the keys of a stage's ``resources``."""
        return {"threads": self.cores, "memory_gb": self.memory_gb, "gpus": self.gpus}


def check_stage_resources(plan, order: list[str], capacity: Capacity) -> None:
    """Refuse, before anything runs, a stage that could never start on this machine."""
    units = {"threads": "cores", "memory_gb": "GB of memory", "gpus": "NVIDIA GPUs"}
    limits = capacity.limits()
    for name in order:
        for key, asked in plan.stages[name].resources.items():
            if key == "ranks":  # one GPU per rank where there are GPUs, else at least a core each
                limit, unit = (capacity.gpus, units["gpus"]) if capacity.gpus else (capacity.cores, units["threads"])
            else:
                limit, unit = limits[key], units[key]
            if asked > limit:
                raise ResourcesError(f"{plan.recipe_path}: stages.{name}.resources.{key}: asks for {asked:g}, but this "
                                     f"machine has {limit:g} {unit}; lower it, or run on a machine or cluster that has "
                                     "them (docs/cluster.md)")


@dataclass
class StagePacker:
    """Which stages may run side by side: their threads, memory and GPUs summed within the
    machine. A stage without ``threads`` counts ``default_threads`` (the cores shared out over
    --max-parallel). The first stage always starts: ``check_stage_resources`` refused any that
    could never fit."""

    capacity: Capacity
    default_threads: int
    held: dict[str, dict] = field(default_factory=dict)

    def demand(self, resources: dict) -> dict:
        return {"threads": resources.get("threads", self.default_threads),
                "memory_gb": resources.get("memory_gb", 0.0), "gpus": resources.get("gpus", 0)}

    def fits(self, resources: dict) -> bool:
        if not self.held:
            return True
        want = self.demand(resources)
        return all(sum(h[k] for h in self.held.values()) + want[k] <= limit
                   for k, limit in self.capacity.limits().items())

    def take(self, name: str, resources: dict) -> None:
        self.held[name] = self.demand(resources)

    def release(self, name: str) -> None:
        self.held.pop(name, None)


RAY_KEYS = {"threads": "CPU", "gpus": "GPU", "memory_gb": "memory"}  # Ray counts memory in bytes


def ray_stage_options(resources: dict, default_threads: int) -> dict[str, float]:
    """A stage's ``resources`` as Ray's ``@ray.remote`` options: Ray places the stage on a node
    with that many CPUs, GPUs and bytes of memory free (and holds them while it runs)."""
    options: dict[str, float] = {"num_cpus": resources.get("threads", default_threads)}
    if resources.get("gpus"):
        options["num_gpus"] = resources["gpus"]
    if resources.get("memory_gb"):
        options["memory"] = int(resources["memory_gb"] * 2**30)
    return options


def check_ray_capacity(plan, names: list[str], default_threads: int, nodes: list[dict]) -> None:
    """Refuse, before anything is submitted, a stage that no node of the Ray cluster could ever
    hold (Ray would keep it pending forever, with a warning in its own log). ``nodes``: the
    ``Resources`` of each live node, as ``ray.nodes()`` reports them."""
    option_keys = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    for name in names:
        wanted = {option_keys[k]: v for k, v in ray_stage_options(plan.stages[name].resources, default_threads).items()}
        if any(all(node.get(key, 0) >= v for key, v in wanted.items()) for node in nodes):
            continue
        largest = {key: max((node.get(key, 0) for node in nodes), default=0) for key in wanted}
        shown = {key: (f"{v / 2**30:.3g} GB" if key == "memory" else f"{v:g}") for key, v in wanted.items()}
        has = {key: (f"{v / 2**30:.3g} GB" if key == "memory" else f"{v:g}") for key, v in largest.items()}
        raise ResourcesError(f"{plan.recipe_path}: stages.{name}.resources: asks Ray for "
                             f"{', '.join(f'{k} {v}' for k, v in shown.items())} on one node, but the cluster's "
                             f"largest node has {', '.join(f'{k} {v}' for k, v in has.items())} ({len(nodes)} node(s)); "
                             "lower it, or add a node that has them")


def stage_placement(runner: str, resources: dict, default_threads: int):
    """The context to submit one stage in: Ray's remote options on a Ray runner; nothing on the
    process runner (``StagePacker`` packs it) or Dask (its workers run one stage each)."""
    if runner.partition(":")[0] != "ray":
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(**ray_stage_options(resources, default_threads))


@contextmanager
def stage_threads(threads: int | None):
    """torch's intra-op thread count for one stage (its ``resources.threads``), restored after."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_IN_POOL_WORKER = False  # set in the process runner's worker processes
_STAGE_RUNNING = False


def _interrupted_once(signum, _frame):
    """The first SIGINT/SIGTERM interrupts the running stage: its MLflow run ends KILLED and its
    temp dir goes. Later ones (the flow process passing a terminal's Ctrl-C on) wait for that
    cleanup. A worker between stages just exits."""
    from flows.errors import Interrupted

    if not _STAGE_RUNNING:
        os._exit(128 + signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def interruptible_stage():
    """Around a stage: in a pool worker, an interrupted stage cleans up and then ends the
    worker, rather than leaving it to wait for a next stage that will never come."""
    global _STAGE_RUNNING
    _STAGE_RUNNING = True
    try:
        yield
    except KeyboardInterrupt as e:
        if _IN_POOL_WORKER:
            sys.stdout.flush()
            os._exit(128 + getattr(e, "signum", signal.SIGINT))
        raise
    finally:
        _STAGE_RUNNING = False


def stop_pool_workers(timeout: float = 10.0) -> None:
    """The flow process was interrupted: pass it on to the worker processes (SIGTERM reaches
    only this process) and wait for their stages to clean up."""
    import multiprocessing
    import time

    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL)  # "broken pool": expected now
    children = multiprocessing.active_children()
    for child in children:
        try:
            os.kill(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()


def _init_worker(threads: int) -> None:
    """Runs once in each local worker process, before its first stage.

    The trainer joins a one-process DeepSpeed group on its first stage and keeps it for the
    process's life; Prefect restores the worker's environment after every task, so the group's
    variables are set here, in the environment that is restored (with a port of the worker's own)."""
    import torch

    from components.train.trainer import _OWN_DIST_ENV, _free_port

    global _IN_POOL_WORKER
    _IN_POOL_WORKER = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted_once)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ[_OWN_DIST_ENV] = "1"


def check_runner_spec(spec: str) -> None:
    scheme, _, _ = spec.partition(":")
    if scheme not in RUNNERS:
        raise RunnerError(f"--runner {spec!r}: expected process, dask[:ADDRESS] or ray[:ADDRESS]")
    if scheme == "process" and spec != "process":
        raise RunnerError(f"--runner {spec!r}: the process runner takes no address (use --max-parallel for its size)")


def stage_task_runner(spec: str, max_parallel: int):
    """The Prefect task runner for ``--runner SPEC`` with ``max_parallel`` workers."""
    check_runner_spec(spec)
    scheme, _, address = spec.partition(":")
    threads = threads_per_stage(max_parallel)
    if scheme == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        # A worker that exits on Ctrl-C leaves its stage's semaphores to the resource tracker,
        # which would print a "leaked semaphore" warning; the tracker takes its -W flags from here.
        sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")

        return ProcessPoolTaskRunner(max_workers=max_parallel, initializer=_init_worker, initargs=(threads,))
    from tasks.engines import engine_module

    module = engine_module(scheme, f"--runner {spec!r}", RunnerError)
    if scheme == "dask":
        # the LocalCluster's scheduler runs in this process and logs every worker at INFO
        verbose = logging.getLogger("paperdag").getEffectiveLevel() <= logging.INFO
        logging.getLogger("distributed").setLevel(logging.INFO if verbose else logging.WARNING)
        if address:
            _check_reachable(spec, address)
            return module.DaskTaskRunner(address=address)
        # worker processes (not threads: see the module docstring), one torch thread budget each
        return module.DaskTaskRunner(cluster_kwargs={
            "n_workers": max_parallel, "threads_per_worker": 1, "processes": True,
            "dashboard_address": None, "silence_logs": logging.ERROR, "env": {"OMP_NUM_THREADS": str(threads)}})
    if address:
        _check_reachable(spec, address)
        return module.RayTaskRunner(address=address)
    # every core: each stage asks Ray for its own threads (ray_stage_options), --max-parallel caps how many run
    return module.RayTaskRunner(init_kwargs={"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                                             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}})


def _check_reachable(spec: str, address: str, timeout: float = 5.0) -> None:
    """A scheduler that does not answer is named in seconds, before the flow starts."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise RunnerError(f"--runner {spec!r}: expected an address like tcp://HOST:PORT")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as e:
        raise RunnerError(f"--runner {spec!r}: {parsed.hostname}:{parsed.port} does not answer "
                          f"({e.strerror or e}); start the scheduler or check the address") from None
