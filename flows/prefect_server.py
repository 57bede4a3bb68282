"""The local Prefect API server a ``paperdag`` process owns when no ``PREFECT_API_URL`` is set.

Prefect's own ephemeral mode starts its server as a plain child process, and that fails the
user three ways (measured on Prefect 3.x):
- it shares the terminal's process group, so Ctrl-C kills it together with the CLI, and
  Prefect's clients then retry the dead address for over a minute before exiting;
- a CLI killed with SIGKILL or SIGTERM leaves it running for minutes;
- two runs started together on a fresh workspace race on migrating its SQLite database.

The server started here is the same Prefect server app under uvicorn, but:
- it runs in its own session, so a terminal's Ctrl-C reaches only the CLI, which then
  reports the interrupted flow to a live API and stops the server itself (at exit, after
  Prefect's own exit handlers have flushed);
- it dies with its parent: ``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread that polls the
  parent pid everywhere (within half a second);
- it starts under a file lock beside the Prefect database, so migrations never race.

With ``PREFECT_API_URL`` set (a ``prefect server start`` or Prefect Cloud), nothing starts here.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from tasks.artifacts import file_lock
from tasks.tracking import unhealthy

STARTUP_TIMEOUT_S = 180.0  # a first start migrates a new database: ~10-60 s on 2 cores


class PrefectServerError(RuntimeError):
    """The local Prefect server did not start (the message carries the end of its log)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog thread still ends it


class ManagedPrefectServer:
    """One server per process, started on first use and stopped at exit."""

    _instance: "ManagedPrefectServer | None" = None

    def __init__(self, prefect_home: Path):
        self.prefect_home = prefect_home
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path = prefect_home / "paperdag-server.log"

    @classmethod
    def shared(cls, prefect_home: Path, meanwhile: Callable[[], None] | None = None) -> "ManagedPrefectServer":
        """This process's server, started if it is not running. ``meanwhile`` runs while it
        starts, or right away when it is already running."""
        if cls._instance is None or not cls._instance.alive:
            cls._instance = cls(prefect_home)
            cls._instance.start(meanwhile)
        elif meanwhile is not None:
            meanwhile()
        return cls._instance

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, meanwhile: Callable[[], None] | None = None) -> None:
        """``meanwhile``: work for this process while the server boots in its own (seconds of
        imports), done once, in this thread, so nothing imports concurrently."""
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        with file_lock(self.prefect_home / "paperdag-server.lock", "another paperdag process is starting "
                                                                     "its Prefect server on this database"):
            for _attempt in range(3):  # a port taken between choosing and binding: choose again
                self.port = _free_port()
                self._spawn()
                if meanwhile is not None:
                    try:
                        meanwhile()
                    except BaseException:
                        self.stop()
                        raise
                    meanwhile = None
                if self._wait_healthy():
                    atexit.register(self.stop)
                    return
        raise PrefectServerError(f"the local Prefect server did not start; end of {self.log_path}:\n"
                                 + self._log_tail())

    def _spawn(self) -> None:
        env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1",
                   PREFECT_HOME=str(self.prefect_home))
        env.pop("PREFECT_API_URL", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.prefect_server", str(os.getpid()), str(self.port)],
                cwd=str(Path(__file__).resolve().parent.parent), env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + float(os.environ.get("PAPERDAG_PREFECT_STARTUP_TIMEOUT", STARTUP_TIMEOUT_S))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if unhealthy(self.api_url, timeout=2) is None:
                return True
            time.sleep(0.1)
        self.stop()
        raise PrefectServerError(f"the local Prefect server did not answer within the startup timeout; end of "
                                 f"{self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def prefect_api_url(state_dir: Path, meanwhile: Callable[[], None] | None = None) -> str | None:
    """The API this process's flows report to: the user's ``PREFECT_API_URL`` (None: use it as
    configured) or a managed local server's. ``meanwhile`` runs while a new server starts, or
    right away when none has to."""
    ours = ManagedPrefectServer._instance
    if os.environ.get("PREFECT_API_URL") and not (ours and os.environ["PREFECT_API_URL"] == ours.api_url):
        if meanwhile is not None:
            meanwhile()
        return None
    home = Path(os.environ.get("PREFECT_HOME") or state_dir / "prefect")
    return ManagedPrefectServer.shared(home, meanwhile).api_url


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def main(argv: list[str]) -> None:
    """Child process: ``python -m flows.prefect_server PARENT_PID PORT``."""
    parent, port = int(argv[0]), int(argv[1])
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main(sys.argv[1:])
