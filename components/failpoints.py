"""Named crash points for the fault-injection tests (like etcd's gofail or TiKV's fail-rs).

``PAPERDAG_FAILPOINT=<name>`` makes the process SIGKILL itself when it reaches that point, so
a test can kill a run exactly mid-checkpoint, mid-rename or mid-logging, which a timer cannot
hit reliably. Unset (always, outside the tests) it costs one dictionary lookup.

Points: ``checkpoint-write`` (model written, trainer state not yet), ``artifact-rename`` (the
finished temp dir about to be renamed into place), ``mlflow-log`` (a stage's run created,
its metrics not yet logged).
"""
from __future__ import annotations

import os
import signal

ENV = "PAPERDAG_FAILPOINT"


def failpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
