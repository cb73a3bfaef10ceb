"""`make run` and `make rotate` as a new user runs them (the same code, a private .local)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import requests

from devstack import free_port
from devstack.processes import http_status
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="commng-local-"))
    path.chmod(0o755)  # like a checkout's .local; the 0700 case falls back to /tmp
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stack_env(local_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DB_SECRET", "AWS_ENDPOINT"))
    }
    env["COMMNG_LOCAL_DIR"] = str(local_dir)
    return env


def _start_stack(local_dir: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    stack = subprocess.Popen(
        [sys.executable, "-m", "devstack", "run", "--port", str(port)],
        cwd=ROOT,
        env=_stack_env(local_dir),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    ready = f"http://127.0.0.1:{port}/readyz"
    wait_for(lambda: stack.poll() is not None or http_status(ready) == 200, timeout_s=90)
    return stack


def _assert_stopped(local_dir: Path, port: int) -> None:
    assert "local stack stopped" in (local_dir / "run.log").read_text()
    assert not (local_dir / "pg" / "data" / "postmaster.pid").exists()
    assert http_status(f"http://127.0.0.1:{port}/healthz", timeout_s=1) is None


def test_make_run_serves_rotates_and_stops_on_ctrl_c(local_dir: Path) -> None:
    port = free_port()
    env = _stack_env(local_dir)
    log = (local_dir / "run.log").open("wb")
    stack = _start_stack(local_dir, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        assert stack.poll() is None, (local_dir / "run.log").read_text()[-3000:]
        output = (local_dir / "run.log").read_text()
        assert f"http://127.0.0.1:{port}/readyz" in output
        assert "make rotate" in output

        channel = requests.post(f"{base}/api/channels", json={"name": "local"}, timeout=10).json()["id"]
        rotate = subprocess.run(
            [sys.executable, "-m", "devstack", "rotate", "--pause", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert rotate.returncode == 0, rotate.stderr[-2000:]
        assert "4/4 AWSCURRENT moved" in rotate.stdout
        assert "Secret Label Updated (AWSCURRENT) event sent" in rotate.stdout
        wait_for(lambda: (local_dir / "run.log").read_text().count("refresh_succeeded") >= 2, timeout_s=30)
        # One worker receives the queue's event (push), the other hears it over NOTIFY.
        wait_for(lambda: "rotation_event_received" in (local_dir / "run.log").read_text(), timeout_s=30)
        posted = requests.post(f"{base}/api/channels/{channel}/messages", json={"body": "after"}, timeout=10)
        assert posted.status_code == 201
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)  # Ctrl-C
        code = stack.wait(90)
        log.close()
    assert code in (0, -signal.SIGINT, 130), (local_dir / "run.log").read_text()[-2000:]
    _assert_stopped(local_dir, port)


def test_make_run_stops_everything_on_sigterm_to_itself_alone(local_dir: Path) -> None:
    """`kill <pid>` or a closed terminal: gunicorn and PostgreSQL must not be left behind."""
    port = free_port()
    with (local_dir / "run.log").open("wb") as log:
        stack = _start_stack(local_dir, port, log)
        try:
            assert stack.poll() is None, (local_dir / "run.log").read_text()[-3000:]
            stack.send_signal(signal.SIGTERM)  # to the Python process only, not its group
            stack.wait(90)
        finally:
            if stack.poll() is None:
                os.killpg(stack.pid, signal.SIGKILL)
                stack.wait(10)
    _assert_stopped(local_dir, port)
