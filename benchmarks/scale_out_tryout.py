"""README section 6 ("Scale out"), tried from a fresh clone, on this machine over loopback.

Clones HEAD into a temporary directory, adds the nano DAG (tests/recipes/nano.yaml) to its
params/ as a user adds a recipe (`paperdag dvc-sync` then gives its stages DVC entries), and runs
there what each row of the section tells a user to do: stages side by side
on local worker processes and on a Dask LocalCluster, one stage on two DeepSpeed ranks, an MLflow
server, a DVC remote (push, lose the artifacts, pull, rerun with every stage cached), and a
Prefect server with a deployment on a work pool run by a separate worker. Each step's command,
exit code, wall time and the output line that shows it worked go to
benchmarks/results/scale_out_tryout.{json,md}. A step that fails is recorded as failed; the
script goes on with the next one.

    python benchmarks/scale_out_tryout.py        (about 10 minutes on 2 cores)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RECIPE = "nano"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> bool:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            time.sleep(1)
    return False


class Tryout:
    def __init__(self, clone: Path):
        self.clone, self.steps = clone, []
        bin_dir = str(Path(sys.executable).parent)  # dvc, mlflow and prefect of this venv
        self.env = dict(os.environ, PYTHONPATH=str(clone), HF_HUB_OFFLINE="1",
                        PATH=f"{bin_dir}:{os.environ['PATH']}", PREFECT_LOGGING_LEVEL="WARNING")

    def run(self, label: str, args: list[str], expect: str, env: dict | None = None, timeout: int = 900) -> bool:
        """``args`` after ``paperdag`` (or a whole command when it starts with a program name);
        passes when the exit code is 0 and ``expect`` (a regex) is in the output."""
        cmd = [sys.executable, "-m", "flows.cli", *args] if args[0] not in ("dvc", "prefect") else args
        shown = "paperdag " + " ".join(args) if cmd[0] == sys.executable else " ".join(args)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.clone, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        seconds = time.perf_counter() - start
        out = proc.stdout + proc.stderr
        found = re.search(expect, out)
        ok = proc.returncode == 0 and found is not None
        self.steps.append({"step": label, "command": shown, "returncode": proc.returncode, "seconds": round(seconds, 1),
                           "passed": ok, "evidence": found.group(0) if found else out.strip().splitlines()[-3:]})
        print(f"{'ok  ' if ok else 'FAIL'} {label}: rc {proc.returncode}, {seconds:.0f}s", flush=True)
        return ok


def main() -> int:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="paperdag-tryout-") as tmp:
        clone = Path(tmp) / "paperdag"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        t = Tryout(clone)
        shutil.copy(clone / "tests" / "recipes" / "nano.yaml", clone / "params" / "nano.yaml")
        t.run("a new recipe gets DVC stages", ["dvc-sync"], r"wrote .*dvc\.yaml")
        t.run("stages side by side on local worker processes", ["run", RECIPE, "--no-progress", "--max-parallel", "2"],
              r"nano: 13 stages, 0 cache hits.*\ncritical path: [^\n]*")
        t.run("stages side by side on a Dask LocalCluster",
              ["run", RECIPE, "--no-progress", "--runner", "dask", "--max-parallel", "2", "--from", "pretrain_dense"],
              r"nano: 13 stages, \d+ cache hits")
        t.run("one stage on two DeepSpeed ranks (torchrun, gloo)",
              ["run", RECIPE, "--no-progress", "--only", "pretrain_dense", "--set",
               "stages.pretrain_dense.resources.ranks=2"], r"(?s)pretrain_dense .*?done in [\d.]+s")

        port = free_port()
        server_dir = Path(tmp) / "mlflow-server"
        server_dir.mkdir()
        mlflow = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                                   "--port", str(port), "--backend-store-uri", f"sqlite:///{server_dir}/mlflow.db",
                                   "--artifacts-destination", str(server_dir / "artifacts")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if wait_http(f"http://127.0.0.1:{port}/health", 120):
                t.run("tracking on an MLflow server", ["run", RECIPE, "--no-progress", "--from", "merge"],
                      r"lineage: mlflow ui --backend-store-uri http://127\.0\.0\.1:\d+",
                      env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
            else:
                t.steps.append({"step": "tracking on an MLflow server", "passed": False,
                                "evidence": "mlflow server did not answer in 120 s"})
        finally:
            os.killpg(mlflow.pid, signal.SIGTERM)

        remote = Path(tmp) / "dvc-remote"
        t.run("a DVC remote: add it", ["dvc", "remote", "add", "-d", "store", str(remote)], r"")
        t.run("a DVC remote: push", ["push"], r"\d+ files? pushed")
        shutil.rmtree(clone / "artifacts")
        shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
        t.run("a DVC remote: pull into an empty workspace", ["pull"], r"\d+ files? (fetched|added)")
        t.run("a DVC remote: rerun with every stage cached", ["run", RECIPE, "--no-progress"],
              r"nano: 13 stages, 13 cache hits")

        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        prefect_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(Path(tmp) / "prefect-home")}
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env={**t.env, **prefect_env},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if wait_http(f"{api}/health", 180):
                t.run("a deployment on a process work pool", ["deploy", RECIPE, "--pool", "tryout"],
                      r"deployment paperdag-recipe/nano-tryout", env=prefect_env)
                t.run("trigger it", ["prefect", "deployment", "run", "paperdag-recipe/nano-tryout"],
                      r"Created flow run", env=prefect_env)
                t.run("a separate worker runs it", ["prefect", "worker", "start", "--pool", "tryout", "--run-once"],
                      r"nano: 13 stages, 13 cache hits", env=prefect_env)
            else:
                t.steps.append({"step": "a deployment on a process work pool", "passed": False,
                                "evidence": "prefect server did not answer in 180 s"})
        finally:
            os.killpg(server.pid, signal.SIGTERM)

    result = {"commit": commit, "recipe": RECIPE, "steps": t.steps,
              "passed": sum(s["passed"] for s in t.steps), "total": len(t.steps)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_out_tryout.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"README section 6 tried from a fresh clone of commit {commit}, on the nano DAG, over loopback: "
             f"**{result['passed']} of {result['total']} steps passed**.", "",
             "| step | command | exit code | seconds | evidence |", "|---|---|---|---|---|"]
    for s in t.steps:
        evidence = s["evidence"] if isinstance(s["evidence"], str) else " / ".join(s["evidence"])
        evidence = evidence.replace("|", "\\|").replace("\n", " / ")
        lines.append(f"| {s['step']} | `{s.get('command', '')}` | {s.get('returncode', '-')} | {s.get('seconds', '-')} | "
                     f"{'' if s['passed'] else '**FAILED** '}{evidence[:160]} |")
    (RESULTS / "scale_out_tryout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] == result["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
