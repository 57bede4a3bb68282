"""A training stage on N data-parallel ranks: ``resources: {ranks: N}``.

The stage's task (in the flow's process or a runner's worker) keeps everything that is one per
stage: the MLflow run, the artifact's temporary directory and the final save. Only training is
launched on N processes, with torchrun's ``--standalone`` agent (one machine; free rendezvous
port; run through this module so that a failure prints one error, not one per rank), or
with the DeepSpeed launcher when ``PAPERDAG_HOSTFILE`` names a hostfile (several machines, which
must share the workspace; see docs/cluster.md). Each rank runs ``python -m tasks.train_ranks
SPEC``: it rebuilds the stage's model, data and method exactly as one rank would
(``tasks.train.prepare_training``) and calls the shared trainer, which gives each rank its slice
of every global batch. Rank 0 streams its log lines to ``metrics.jsonl`` (the task forwards them
to MLflow while training runs) and writes the trained weights and ``TrainResult`` for the task
to load. A failing rank writes its error, and the task raises it under the stage's name.

The hand-off directory lives under ``.paperdag/ranks/`` and is removed whatever happens; an
interrupted task stops the whole launcher process group, so no rank outlives its stage.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.artifacts import DIGEST_LEN

if TYPE_CHECKING:
    from components.train.trainer import TrainResult

HOSTFILE_ENV = "PAPERDAG_HOSTFILE"
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_FLAG = "--torchrun"


class RankFailedError(RuntimeError):
    """A rank of a multi-rank training stage failed; the message is that rank's error."""


def launcher_command(spec_path: Path, ranks: int, hostfile: str | None = None) -> list[str]:
    """``torchrun --standalone`` on this machine, or the DeepSpeed launcher over a hostfile (where
    ``ranks`` is the number of ranks on each host)."""
    worker = ["-m", "tasks.train_ranks", str(spec_path)]
    if hostfile:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile,
                "--num_gpus", str(ranks), "--module", "tasks.train_ranks", str(spec_path)]
    # torchrun's own main, wrapped so that its failure report stays quiet when a rank reported
    return [sys.executable, "-m", "tasks.train_ranks", LAUNCH_FLAG, "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(ranks), *worker]


def train_on_ranks(ctx, model, ranks: int, checkpoints: Path, on_log) -> "TrainResult":
    """Train the stage of ``ctx`` on ``ranks`` processes, load rank 0's weights into ``model``
    (built as each rank builds its own) and return rank 0's ``TrainResult``. Rank 0's log lines
    go to ``on_log`` while training runs."""
    from components.train.trainer import _OWN_DIST_ENV, TrainResult, load_weights

    plan, method_cls = ctx.plan, type(ctx.method)
    handoff = ctx.workspace.state_dir / "ranks" / f"{plan.digest[:DIGEST_LEN]}-{os.getpid()}"
    shutil.rmtree(handoff, ignore_errors=True)
    handoff.mkdir(parents=True)
    try:
        import torch

        per_rank = max(1, torch.get_num_threads() // ranks)  # the stage's threads, shared out
        spec = {
            "stage": plan.name, "kind": plan.kind, "method": plan.method,
            # the registered class the task already resolved, so ranks never read a recipe's text
            "method_class": f"{method_cls.__module__}:{method_cls.__qualname__}",
            "params": plan.params, "options": plan.options,
            "inputs": {role: str(ctx.input(role).path) for role in ctx.inputs},
            "checkpoints": str(checkpoints), "progress": ctx.progress, "threads": per_rank,
            "handoff": str(handoff),
        }
        spec_path = handoff / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        # a single-process group of ours, set up earlier in this process, would pin world size 1
        env = {k: v for k, v in os.environ.items() if k not in (*RANK_ENV, _OWN_DIST_ENV)}
        env["OMP_NUM_THREADS"] = str(per_rank)
        command = launcher_command(spec_path, ranks, os.environ.get(HOSTFILE_ENV))
        _run_launcher(command, env, handoff, on_log, plan.name, ranks)
        load_weights(model, handoff / "model.safetensors")
        return TrainResult(**json.loads((handoff / "result.json").read_text()))
    finally:
        shutil.rmtree(handoff, ignore_errors=True)


def _run_launcher(command: list[str], env: dict, handoff: Path, log_metrics, stage: str, ranks: int) -> None:
    # Its own session: a terminal's Ctrl-C reaches this process, which then stops the group.
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    forwarded = 0  # bytes of metrics.jsonl logged so far
    try:
        while True:
            rc = proc.poll()
            forwarded = _forward_metrics(handoff / "metrics.jsonl", forwarded, log_metrics)
            if rc is not None:
                break
            time.sleep(0.5)
    except BaseException:
        _stop_group(proc)
        raise
    if rc != 0:
        raise _rank_error(handoff, stage, ranks, rc)


def _forward_metrics(path: Path, offset: int, log_metrics) -> int:
    """Log the complete lines written after byte ``offset``; returns the offset past them (a
    last line still being written waits for the next call)."""
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    for line in complete.splitlines():
        event = json.loads(line)
        log_metrics(event["step"], event["metrics"])
    return offset + len(complete)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _rank_error(handoff: Path, stage: str, ranks: int, rc: int) -> Exception:
    from components.train.trainer import NonFiniteLossError

    # the same types a one-rank stage raises, so the flow reports them the same way
    known = {"NonFiniteLossError": NonFiniteLossError, "ValueError": ValueError, "TokenizerMismatchError": ValueError}
    for path in sorted(handoff.glob("error-rank*.json")):
        error = json.loads(path.read_text())
        rank = path.stem.removeprefix("error-rank")
        raised = known.get(error["type"], RankFailedError)(f"stage {stage}: rank {rank} of {ranks}: {error['message']}")
        if error.get("traceback"):  # shown with --verbose, as a one-rank stage's traceback would be
            raised.add_note(f"rank {rank}'s traceback:\n{error['traceback'].rstrip()}")
        return raised
    return RankFailedError(f"stage {stage}: the {ranks}-rank launcher exited with code {rc} before any rank "
                           "reported an error (see its output above)")


def _rank_main(spec_path: Path) -> None:
    """One rank: rebuild the stage's training inputs, train, and (rank 0) hand the result back."""
    import torch

    from tasks.artifacts import Artifact, read_manifest
    from tasks.train import prepare_training
    from components.train.trainer import end_distributed, save_weights, train

    spec = json.loads(spec_path.read_text())
    handoff, rank = Path(spec["handoff"]), int(os.environ["RANK"])
    try:
        torch.set_num_threads(spec["threads"])
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        module, _, name = spec["method_class"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        method = cls(cls.Params.model_validate(spec["params"]))
        inputs = {role: Artifact(Path(path), read_manifest(Path(path))[0]) for role, path in spec["inputs"].items()}
        setup = prepare_training(spec["stage"], spec["kind"], spec["method"], spec["options"], method, inputs)
        with open(handoff / "metrics.jsonl", "a") if rank == 0 else open(os.devnull, "w") as metrics:
            def on_log(step: int, values: dict) -> None:
                metrics.write(json.dumps({"step": step, "metrics": values}) + "\n")
                metrics.flush()

            result = train(setup.model, setup.blocks, method.params, method, teacher=setup.teacher,
                           checkpoint_dir=Path(spec["checkpoints"]), on_log=on_log, progress=spec["progress"],
                           sampler=setup.sampler, monitor=setup.monitor)
        if rank == 0:
            save_weights(setup.model, handoff / "model.safetensors")
            (handoff / "result.json").write_text(json.dumps(dataclasses.asdict(result)))
    except Exception as e:
        # The task raises this under the stage's name (with the traceback for --verbose); the
        # rank itself prints nothing, so N ranks do not print N tracebacks of one error.
        (handoff / f"error-rank{rank}.json").write_text(json.dumps(
            {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}))
        sys.exit(1)
    except BaseException as e:  # Ctrl-C, SIGTERM from the task: the task knows why
        (handoff / f"error-rank{rank}.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise
    end_distributed()  # only on success: a failed rank must not wait in a barrier for the others


def _torchrun_main(argv: list[str]) -> int:
    """torchrun (its elastic agent, unchanged) with its failure report kept for when it says
    something new: a rank that failed wrote its error for the task, which raises it; torchrun's
    own warnings, the agent's traceback and its failure table would add about 40 lines."""
    import logging

    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read by torch.distributed.elastic's loggers at import
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the rest use plain getLogger

    try:
        main(argv)
    except ChildFailedError as e:
        handoff = Path(json.loads(Path(argv[-1]).read_text())["handoff"])
        if not any(handoff.glob("error-rank*.json")):
            print(e, file=sys.stderr)  # no rank reported: this is all there is to go on
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1] == LAUNCH_FLAG:
        sys.exit(_torchrun_main(sys.argv[2:]))
    _rank_main(Path(sys.argv[1]))
