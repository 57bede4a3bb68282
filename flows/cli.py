"""The ``paperdag`` command line.

    paperdag run RECIPE [--set k=v] [--only STAGE | --from STAGE]
    paperdag stage RECIPE STAGE          # one stage; the entry point dvc.yaml calls
    paperdag serve RECIPE --cron "0 3 * * *"
    paperdag deploy RECIPE --pool NAME [--cron "0 3 * * *"]  # for `prefect worker start --pool NAME`
    paperdag verify [RECIPE|DIGEST]      # re-hash artifacts against their manifests
    paperdag dvc-sync [--check]
    paperdag lineage DIGEST_OR_RUN_ID [--json] [--depth N]
    paperdag list [--json] | validate RECIPE
    paperdag status RECIPE [--only S | --from S] [--json]   # what is cached, what a run would compute
    paperdag show DIGEST|RECIPE:STAGE [--json]             # an artifact's manifest and metrics
    paperdag export DIGEST|RECIPE:STAGE PATH [--format compressed-tensors]  # copy an artifact out
    paperdag gc [--yes | --dry-run]                        # remove artifacts no recipe references
    paperdag push | pull [--remote NAME]                   # artifacts to and from a DVC remote
    paperdag completion bash                               # shell completion script

Failures print one line (``--verbose`` adds the traceback). Exit codes: 0 ok, 1 a stage or
the environment failed, 2 a wrong request (recipe, override, selection), 130 Ctrl-C,
143 SIGTERM.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager

from tasks.workspace import Workspace

EXIT_USAGE = 2  # invalid recipe, override or stage selection
EXIT_FAILED = 1  # a stage failed


def _workspace(args, writes: bool = False) -> Workspace:
    ws = Workspace.from_env(args.workspace)
    ws.configure_environment()
    if writes:
        from flows.inspection import hold_workspace
        from tasks.tracking import check_tracking_server

        if getattr(args, "recipe", None):  # a wrong directory writes nothing
            from flows.recipe_path import resolve_recipe_path

            resolve_recipe_path(args.recipe, ws.root)
        ws.check_writable()
        hold_workspace(ws)  # `gc` waits for this process
        check_tracking_server(ws.tracking_uri)  # seconds, before the recipe compiles and servers start
    return ws


@contextmanager
def _prefect_api(ws: Workspace, meanwhile=None):
    """Flows report to the user's PREFECT_API_URL, or to a local server this process owns
    (flows/prefect_server.py) instead of Prefect's ephemeral one. ``meanwhile``: work done
    while that server starts."""
    from prefect.context import refresh_global_settings_context

    from flows.prefect_server import prefect_api_url

    url = prefect_api_url(ws.state_dir, meanwhile)
    if url is None:
        _check_prefect_api(os.environ["PREFECT_API_URL"])
        yield
        return
    # Prefect's global settings, not a context of this thread, and for the rest of this process:
    # Prefect's own threads (the process runner's message forwarder) and exit handlers (the
    # events flush) read those, and with no URL there they start Prefect's own ephemeral server,
    # which on a busy machine made Ctrl-C take 43 s. Worker processes inherit the environment.
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    try:
        yield
    finally:
        _drain_prefect_events()


def _drain_prefect_events(timeout: float = 3.0) -> None:
    """Send the events and logs Prefect still queues to the server while it is certainly up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001, S110 - best effort; what is lost is telemetry, not results
            pass


def _check_prefect_api(url: str) -> None:
    from tasks.tracking import unhealthy

    if (reason := unhealthy(url)) is not None:
        raise ConnectionError(f"Prefect API {url} is unreachable ({reason}); start it, or unset PREFECT_API_URL "
                              "to let paperdag run a local one")


def cmd_run(args) -> int:
    if args.dry_run:
        return cmd_status(args)
    ws = _workspace(args, writes=True)
    from flows.pipeline import recipe_flow, stages_to_run
    from flows.plan_cache import compiled_plan
    from flows.recipe_path import resolve_recipe_path
    from flows.report import print_summary

    path = resolve_recipe_path(args.recipe, ws.root)
    plan, _ = compiled_plan(path, args.set)  # fail fast, before Prefect starts
    order, _ = stages_to_run(plan, args.only, args.from_stage)
    _refuse_missing_inputs(plan, ws, order)
    flow, max_parallel = _flow_with_runner(recipe_flow, args)
    if ":" not in args.runner:  # this machine runs the stages; a cluster at an address places its own
        from flows.parallel import Capacity, check_stage_resources

        check_stage_resources(plan, order, Capacity.local())
    print(f"paperdag: recipe {plan.name} ({len(plan.stages)} stages) from {path}")
    from tasks.tracking import import_tracking_client

    # MLflow's imports (seconds) overlap the Prefect server's start-up instead of following it
    with _prefect_api(ws, meanwhile=lambda: import_tracking_client(ws.tracking_uri)):
        summary = flow(str(path), overrides=args.set, only=args.only, from_stage=args.from_stage,
                       workspace=str(ws.root), progress=not args.no_progress, max_parallel=max_parallel,
                       runner=args.runner)
    print_summary(summary, plan, ws)
    _record_in_dvc(ws, summary)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of stages, 1 or more, got {text!r}")
    return int(text)


def _default_parallel() -> int:
    from flows.parallel import default_max_parallel

    return default_max_parallel()


def _parallel_limit(args, default: int) -> int:
    """``--max-parallel`` (or ``default``), checked together with ``--runner``."""
    from flows.parallel import RunnerError, check_runner_spec

    max_parallel = args.max_parallel or default
    check_runner_spec(args.runner)
    if max_parallel == 1 and args.runner != "process":
        raise RunnerError(f"--runner {args.runner} runs stages side by side: give --max-parallel N, N > 1")
    return max_parallel


def _flow_with_runner(recipe_flow, args):
    """(the flow on the task runner ``--runner``/``--max-parallel`` ask for, its stage limit)."""
    from flows.parallel import stage_task_runner

    max_parallel = _parallel_limit(args, _default_parallel())
    if max_parallel == 1:
        return recipe_flow, 1
    return recipe_flow.with_options(task_runner=stage_task_runner(args.runner, max_parallel)), max_parallel


def _refuse_missing_inputs(plan, ws: Workspace, order: list[str]) -> None:
    from flows.errors import StageSelectionError
    from flows.inspection import missing_inputs

    missing = missing_inputs(plan, ws, order)
    if missing:
        needed = sorted({up for _, up in missing})
        raise StageSelectionError(
            "; ".join(f"stage {name} reads {up}, which is not built" for name, up in missing)
            + f". Run without --only (a run builds what is missing), or add {' '.join(f'--only {u}' for u in needed)}")


def _record_in_dvc(ws: Workspace, summary) -> None:
    """In a DVC project, what the flow built goes into dvc.lock, as if `dvc repro` had built it."""
    from flows.dvc_sync import DvcError, is_dvc_repo, record_in_dvc

    if not is_dvc_repo(ws.root):
        return
    try:
        committed, foreign = record_in_dvc(ws.root, [o.path for o in summary.outcomes],
                                           cached={o.path for o in summary.outcomes if o.cached})
    except DvcError as e:  # the artifacts are built and cached; only DVC's record is missing
        print(f"warning: {e}; run `dvc commit` yourself", file=sys.stderr)
        return
    if not committed and not foreign:
        return  # dvc.lock already records every artifact of this run
    print(f"dvc: recorded {len(committed)} stages in dvc.lock"
          + (f"; {foreign} artifacts are not dvc.yaml stages (built with --set, or run `paperdag dvc-sync`)"
             if foreign else ""))


def cmd_push_pull(args) -> int:
    ws = _workspace(args, writes=args.command == "pull")
    from flows.dvc_sync import push_or_pull

    out = push_or_pull(ws.root, args.command, args.remote)
    print(out or f"dvc {args.command}: done")
    return 0


def cmd_stage(args) -> int:
    ws = _workspace(args, writes=True)
    from flows.errors import StageFailedError
    from flows.plan_cache import compiled_plan
    from flows.recipe_path import resolve_recipe_path
    from tasks.runner import execute_stage
    from tasks.tracking import Tracker

    path = resolve_recipe_path(args.recipe, ws.root)
    plan, _ = compiled_plan(path, args.set)
    if args.stage not in plan.stages:
        print(f"error: recipe {plan.name} has no stage {args.stage!r}; stages: {', '.join(plan.stages)}", file=sys.stderr)
        return EXIT_USAGE
    stage = plan.stages[args.stage]
    if args.expect_digest and not stage.digest.startswith(args.expect_digest):
        print(f"error: dvc.yaml is stale: stage {args.stage} now has digest {stage.digest[:16]}, dvc.yaml expects "
              f"{args.expect_digest}; run `paperdag dvc-sync` and then `dvc repro`", file=sys.stderr)
        return EXIT_USAGE
    from flows.parallel import Capacity, check_stage_resources, stage_threads

    check_stage_resources(plan, [args.stage], Capacity.local())
    tracker = None if args.no_track else Tracker(ws, plan.name)
    try:
        with stage_threads(stage.resources.get("threads")):
            outcome = execute_stage(plan, args.stage, ws, tracker, force=args.force, launcher=args.launcher,
                                    progress=not args.no_progress)
    except Exception as e:
        raise StageFailedError(args.stage, stage.kind, stage.method, e, ws.root) from e
    print(f"{args.stage}: {'cached' if outcome.cached else 'done'} {outcome.path}")
    return 0


def cmd_serve(args) -> int:
    ws = _workspace(args, writes=True)
    from prefect import serve
    from prefect.deployments.runner import EntrypointType

    from flows.deploy import deployment_fields
    from flows.pipeline import recipe_flow
    from flows.plan_cache import compiled_plan
    from flows.recipe_path import resolve_recipe_path

    path = resolve_recipe_path(args.recipe, ws.root)
    plan, _ = compiled_plan(path, args.set)
    max_parallel = _parallel_limit(args, 1)
    deployment = recipe_flow.to_deployment(
        name=args.name or f"{plan.name}-scheduled",
        cron=args.cron,
        entrypoint_type=EntrypointType.MODULE_PATH,
        **deployment_fields(plan, path, ws, args.set, max_parallel, args.runner),
    )
    print(f"paperdag: serving {plan.name} on cron {args.cron!r} (Ctrl-C to stop)")
    with _prefect_api(ws):
        serve(deployment, print_starting_message=True)
    return 0


def cmd_deploy(args) -> int:
    """A deployment on a Prefect work pool: a `prefect worker` (here or on another machine with
    the project and its workspace) picks its runs up. Needs a persistent Prefect API."""
    from flows.errors import DeploymentError

    if not os.environ.get("PREFECT_API_URL"):
        raise DeploymentError("paperdag deploy needs a Prefect server that outlives this command: start one "
                              "(`prefect server start`) and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    ws = _workspace(args, writes=True)
    from flows.deploy import deploy_recipe, deployment_fields
    from flows.plan_cache import compiled_plan
    from flows.recipe_path import resolve_recipe_path

    path = resolve_recipe_path(args.recipe, ws.root)
    plan, _ = compiled_plan(path, args.set)
    fields = deployment_fields(plan, path, ws, args.set, _parallel_limit(args, 1), args.runner)
    with _prefect_api(ws):
        deployment_id, name = deploy_recipe(fields, args.pool, args.name or f"{plan.name}-{args.pool}", args.cron)
    print(f"paperdag: deployment {name} ({deployment_id}) on work pool {args.pool!r}"
          + (f", cron {args.cron!r}" if args.cron else "") + "\n"
          f"  start a worker:  prefect worker start --pool {args.pool}\n"
          f"  trigger a run:   prefect deployment run '{name}'")
    return 0


def cmd_dvc_sync(args) -> int:
    ws = _workspace(args, writes=not args.check)
    from flows.dvc_sync import render_dvc_yaml

    text = render_dvc_yaml(ws.root)
    target = ws.root / "dvc.yaml"
    if args.check:
        if not target.exists() or target.read_text() != text:
            print("error: dvc.yaml is out of date with the recipes or the code; run `paperdag dvc-sync`", file=sys.stderr)
            return EXIT_FAILED
        print("dvc.yaml is up to date")
        return 0
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    print(f"wrote {target}")
    return 0


def cmd_verify(args) -> int:
    ws = _workspace(args)
    from flows.verify import verify

    return verify(ws, args.ref)


def cmd_lineage(args) -> int:
    ws = _workspace(args)
    from flows.lineage import print_lineage

    return print_lineage(ws, args.ref, as_json=args.json, depth=args.depth)


def cmd_list(args) -> int:
    ws = _workspace(args)
    from flows.report import print_catalogue

    print_catalogue(ws, as_json=args.json)
    return 0


def cmd_status(args) -> int:
    ws = _workspace(args)
    from flows.inspection import print_status, stage_status
    from flows.plan_cache import compiled_plan
    from flows.recipe_path import resolve_recipe_path
    from flows.selection import stages_to_run

    plan, _ = compiled_plan(resolve_recipe_path(args.recipe, ws.root), args.set)
    order, forced = stages_to_run(plan, args.only, args.from_stage)
    print_status(plan, stage_status(plan, ws, order, forced), args.json)
    return 0


def cmd_show(args) -> int:
    ws = _workspace(args)
    from flows.inspection import artifact_summary, print_artifact, resolve_artifact

    print_artifact(artifact_summary(resolve_artifact(ws, args.ref)), args.json)
    return 0


def cmd_export(args) -> int:
    ws = _workspace(args)
    from pathlib import Path

    from flows.inspection import export

    print(f"exported to {export(ws, args.ref, Path(args.path), args.format)}")
    return 0


def cmd_gc(args) -> int:
    ws = _workspace(args)
    from flows.inspection import gc

    return gc(ws, yes=args.yes, dry_run=args.dry_run)


def cmd_completion(args) -> int:
    from flows.completion import bash_completion

    print(bash_completion(build_parser()))
    return 0


def cmd_validate(args) -> int:
    ws = _workspace(args)
    from flows.plan_cache import compiled_plan
    from flows.recipe_path import resolve_recipe_path

    path = resolve_recipe_path(args.recipe, ws.root)
    plan, _ = compiled_plan(path, args.set)
    for s in plan.stages.values():
        print(f"  {s.name:<18} {s.kind:<9} {s.method:<16} {s.digest[:16]}  <- {', '.join(s.upstream) or '-'}")
    print(f"{path}: valid ({len(plan.stages)} stages, {len(plan.claims)} claims)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paperdag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", help="project root holding params/ (default: $PAPERDAG_WORKSPACE or cwd)")
    p.add_argument("--verbose", "-v", "--debug", dest="verbose", action="store_true",
                   help="show tracebacks and Prefect's own log")
    p.add_argument("--version", action="version", version=f"paperdag {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_cmd(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe name under params/ or a path to a YAML file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stages.quantize.params.bits=8")
        sp.set_defaults(fn=fn)
        return sp

    def selection(sp):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--only", action="append", default=[], metavar="STAGE",
                       help="rerun just this stage on cached inputs")
        g.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and everything downstream")

    def side_by_side(sp, default: str):
        sp.add_argument("--max-parallel", type=_positive_int, metavar="N",
                        help=f"run up to N independent stages side by side, each with cores/N torch threads "
                             f"(default: {default})")
        sp.add_argument("--runner", default="process", metavar="SPEC",
                        help="where side-by-side stages run: process (default; local processes), dask[:ADDRESS] "
                             "or ray[:ADDRESS] (needs prefect-dask / prefect-ray)")

    r = recipe_cmd("run", cmd_run, "run a recipe as a Prefect flow")
    selection(r)
    r.add_argument("--dry-run", action="store_true", help="only show what would run (same as `paperdag status`)")
    r.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--allow-over-budget", action="store_true",
                   help="run stages that would take over PAPERDAG_MAX_STAGE_HOURS or more memory than is free")
    side_by_side(r, f"one per two cores, here {_default_parallel()}")

    s = recipe_cmd("stage", cmd_stage, "run one stage (the entry point dvc.yaml uses)")
    s.add_argument("stage")
    s.add_argument("--force", action="store_true", help="recompute even if the artifact exists")
    s.add_argument("--launcher", default="cli", help=argparse.SUPPRESS)
    s.add_argument("--expect-digest", help=argparse.SUPPRESS)
    s.add_argument("--no-track", action="store_true", help="do not record an MLflow run")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--allow-over-budget", action="store_true", help="see `paperdag run --help`")

    sv = recipe_cmd("serve", cmd_serve, "register a scheduled Prefect deployment and serve it")
    sv.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    sv.add_argument("--name", help="deployment name (default RECIPE-scheduled)")
    side_by_side(sv, "1; each scheduled run gets this")

    dp = recipe_cmd("deploy", cmd_deploy, "create a deployment on a Prefect work pool (run by `prefect worker`)")
    dp.add_argument("--pool", required=True, help="work pool name; a process pool of that name is created if missing")
    dp.add_argument("--cron", help='optional cron schedule, e.g. "0 3 * * *"')
    dp.add_argument("--name", help="deployment name (default RECIPE-POOL)")
    side_by_side(dp, "1; the worker's machine, not this one, runs the stages")

    d = sub.add_parser("dvc-sync", help="regenerate dvc.yaml from the recipes")
    d.add_argument("--check", action="store_true", help="fail if dvc.yaml is out of date")
    d.set_defaults(fn=cmd_dvc_sync)

    ve = sub.add_parser("verify", help="re-hash artifacts against their manifests (all, a recipe's, or one)")
    ve.add_argument("ref", nargs="?", help="recipe name or path, or artifact digest (prefix); default: every artifact")
    ve.set_defaults(fn=cmd_verify)

    li = sub.add_parser("lineage", help="print the chain from an artifact or MLflow run back to the data")
    li.add_argument("ref", help="artifact digest (prefix) or MLflow run id")
    li.add_argument("--depth", type=int, help="stop this many inputs deep")
    li.add_argument("--json", action="store_true")
    li.set_defaults(fn=cmd_lineage)

    ls = sub.add_parser("list", help="list recipes with their paper, stages, claims and catalogue results")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)

    recipe_cmd("validate", cmd_validate, "validate a recipe without running it")

    st = recipe_cmd("status", cmd_status, "show each stage's digest, whether it is cached, and what a run "
                                          "would compute (nothing runs)")
    selection(st)
    st.add_argument("--json", action="store_true")

    sh = sub.add_parser("show", help="show an artifact's manifest, facts and metrics")
    sh.add_argument("ref", help="artifact digest (prefix) or RECIPE:STAGE")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(fn=cmd_show)

    ex = sub.add_parser("export", help="copy an artifact (checked against its manifest) to a new directory")
    ex.add_argument("ref", help="artifact digest (prefix) or RECIPE:STAGE")
    ex.add_argument("path", help="destination; must not exist")
    from flows.inspection import EXPORT_FORMATS  # torch-free, like every command that only looks

    ex.add_argument("--format", default="copy", choices=EXPORT_FORMATS,
                    help="copy: the artifact as it is (default); compressed-tensors: a quantize artifact's "
                         "integer codes as llm-compressor's format, which transformers loads as quantized")
    ex.set_defaults(fn=cmd_export)

    gc = sub.add_parser("gc", help="remove artifacts that no recipe in params/ references")
    gc_mode = gc.add_mutually_exclusive_group()
    gc_mode.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    gc_mode.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(fn=cmd_gc)

    for action, help_ in (("push", "record built artifacts in dvc.lock and `dvc push` them to a DVC remote"),
                          ("pull", "`dvc pull` the artifacts dvc.lock records from a DVC remote")):
        pp = sub.add_parser(action, help=help_)
        pp.add_argument("--remote", "-r", help="DVC remote name (default: the project's default remote)")
        pp.set_defaults(fn=cmd_push_pull)

    co = sub.add_parser("completion", help="print a shell completion script: "
                                           "`source <(paperdag completion bash)`")
    co.add_argument("shell", choices=["bash"])
    co.set_defaults(fn=cmd_completion)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paperdag")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _raise_interrupted(signum, _frame):
    from flows.errors import Interrupted

    raise Interrupted(signum)


@contextmanager
def _signals_as_interrupts():
    """SIGTERM takes the Ctrl-C path: runs end KILLED, temp dirs go, the local server stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _configure_logging(verbose: bool) -> None:
    """paperdag's own warnings (a corrupt checkpoint skipped, a reconstruction that got worse)
    go to stderr as one line each; Prefect's own log only with --verbose."""
    logger = logging.getLogger("paperdag")
    if not any(getattr(h, "_paperdag", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("paperdag: %(message)s"))
        handler._paperdag = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    # MLflow logs its migrations at INFO and store errors with tracebacks; the CLI reports those itself
    os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO" if verbose else os.environ.get("MLFLOW_LOGGING_LEVEL", "CRITICAL")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    if verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    else:  # a failed stage is reported once, by us, not as Prefect's task and flow tracebacks
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    ws = Workspace.from_env(args.workspace)
    ws.configure_environment()  # before Prefect/MLflow are imported
    from flows.errors import Interrupted, RecipeError, StageFailedError, StageSelectionError, describe
    from flows.inspection import InspectTargetError, release_workspace
    from flows.parallel import RunnerError
    from flows.verify import VerifyTargetError

    if getattr(args, "allow_over_budget", False):
        os.environ["PAPERDAG_ALLOW_OVER_BUDGET"] = "1"
    try:
        with _signals_as_interrupts():
            return args.fn(args)
    except (RecipeError, StageSelectionError, VerifyTargetError, InspectTargetError, RunnerError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}); runs marked KILLED, finished stages stay cached",
              file=sys.stderr)
        return 128 + signum
    except Exception as e:  # a failed stage or environment: one line, not a wall of traceback
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e if isinstance(e, StageFailedError) else describe(e, ws.root)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        release_workspace()
        # Interpreter shutdown would walk the whole heap of Prefect, MLflow and torch objects once
        # more (3 s on 2 cores, measured; most of a Ctrl-C's exit time). Frozen objects are skipped;
        # files and runs are closed by then, and atexit handlers (the local server) still run.
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
