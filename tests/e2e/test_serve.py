"""`paperdag serve` registers a real Prefect deployment with the cron schedule and serves it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_workspace

pytestmark = pytest.mark.e2e


def test_serve_registers_cron_schedule(tmp_path):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    ws = make_workspace(tmp_path / "ws")
    with prefect_test_harness(server_startup_timeout=180):
        api = PREFECT_API_URL.value()
        env = dict(os.environ, PREFECT_API_URL=api, PAPERDAG_WORKSPACE=str(ws),
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "nano", "--cron", "0 3 * * *"],
                                cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deployment = None
            deadline = time.time() + 120
            while time.time() < deadline and deployment is None:
                assert proc.poll() is None, proc.stdout.read()
                deployment = asyncio.run(_read_deployment("paperdag-recipe/nano-scheduled"))
                time.sleep(1)
            assert deployment is not None, "the deployment never appeared in the Prefect API"
            crons = [s.schedule.cron for s in deployment.schedules]
            assert crons == ["0 3 * * *"]
            assert deployment.schedules[0].active
            assert deployment.parameters["recipe"].endswith("params/nano.yaml")
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


async def _read_deployment(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None
