"""`make run`, `make rotate` and `make status` as a new user runs them (the same code, a private .local).

One stack serves every test that needs a running one (module-scoped); Ctrl-C stops it at
the end and the teardown checks that nothing is left. SIGTERM gets a stack of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import requests

from devstack import free_port
from devstack.processes import http_status
from tests.helpers import assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _new_local_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="commng-local-"))
    path.chmod(0o755)  # like a checkout's .local; the 0700 case falls back to /tmp
    return path


@pytest.fixture
def local_dir() -> Iterator[Path]:
    path = _new_local_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stack_env(local_dir: Path) -> dict[str, str]:
    prefixes = ("POSTGRES_", "DB_SECRET", "AWS_ENDPOINT", "PROMETHEUS_", "ADMIN_TOKEN", "PORT", "LOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["COMMNG_LOCAL_DIR"] = str(local_dir)
    return env


def _devstack(local_dir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        cwd=ROOT,
        env=_stack_env(local_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


@dataclass
class RunningStack:
    process: subprocess.Popen[bytes]
    local_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.local_dir / "run.log").read_text(errors="replace")

    def state(self) -> dict[str, str]:
        state: dict[str, str] = json.loads((self.local_dir / "stack.json").read_text())
        return state


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    """`python -m devstack run` on a free port; Ctrl-C after the module's last test."""
    local_dir = _new_local_dir()
    # What a run killed with SIGKILL leaves: its lock file (the lock died with it).
    (local_dir / "run.lock").write_text(json.dumps({"pid": 999999, "port": 1}))
    port = free_port()
    log = (local_dir / "run.log").open("wb")
    process = _start_stack(local_dir, port, log)
    running = RunningStack(process, local_dir, port)
    try:
        assert process.poll() is None, running.log()[-3000:]
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        code = process.wait(90)
        log.close()
        try:
            assert code in (0, -signal.SIGINT, 130), running.log()[-2000:]
            _assert_stopped(local_dir, port)
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)


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


def test_without_a_stack_rotate_and_env_say_so_in_one_line(local_dir: Path) -> None:
    for command in ("rotate", "env"):
        result = _devstack(local_dir, command)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"no local stack is running (state in {local_dir}): start it with `make run` first"
        ]
        assert result.stdout == ""


def test_make_run_serves_and_rotates(stack: RunningStack) -> None:
    output = stack.log()
    assert f"http://127.0.0.1:{stack.port}/readyz" in output
    assert "make rotate" in output
    assert "make status" in output

    channel = requests.post(f"{stack.url}/api/channels", json={"name": "local"}, timeout=10).json()["id"]
    rotate = _devstack(stack.local_dir, "rotate", "--pause", "1", timeout=60)
    assert rotate.returncode == 0, rotate.stderr[-2000:]
    assert "4/4 AWSCURRENT moved" in rotate.stdout
    assert "Secret Label Updated (AWSCURRENT) sent" in rotate.stdout
    wait_for(lambda: stack.log().count("refresh_succeeded") >= 2, timeout_s=30)
    # One worker receives the queue's event (push), the other hears it over NOTIFY.
    wait_for(lambda: "rotation_event_received" in stack.log(), timeout_s=30)
    posted = requests.post(f"{stack.url}/api/channels/{channel}/messages", json={"body": "after"}, timeout=10)
    assert posted.status_code == 201


def test_a_second_run_is_refused_in_one_line_and_the_first_keeps_serving(stack: RunningStack) -> None:
    second = _devstack(stack.local_dir, "run", "--port", str(free_port()), timeout=30)

    assert second.returncode == 1
    assert second.stderr.splitlines() == [
        f"a local stack is already running (pid {stack.process.pid}, {stack.url}, "
        f"state in {stack.local_dir}): stop it with Ctrl-C in its terminal or `kill {stack.process.pid}`"
    ]
    assert second.stdout == ""
    assert http_status(f"{stack.url}/readyz") == 200  # its PostgreSQL was left alone
    assert requests.get(f"{stack.url}/api/channels", timeout=10).status_code == 200


def test_the_state_file_is_private_from_its_creation(stack: RunningStack) -> None:
    state_file = stack.local_dir / "stack.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert {"superuser_password", "app_password", "admin_token"} <= set(stack.state())
    # initdb's password file is gone, and no temporary file was left next to either.
    assert not list(stack.local_dir.rglob("*pwfile*"))
    assert not list(stack.local_dir.glob(".*.tmp"))


def test_make_status_and_the_env_command_show_the_running_service(stack: RunningStack) -> None:
    env = _devstack(stack.local_dir, "env")
    assert env.returncode == 0, env.stderr
    exports = dict(re.findall(r"^export (\w+)=(.*)$", env.stdout, re.MULTILINE))
    assert exports["PORT"] == str(stack.port)
    assert {"DB_SECRET_ID", "AWS_ENDPOINT_URL_SECRETS_MANAGER", "ADMIN_TOKEN"} <= set(exports)
    assert "POSTGRES_PASSWORD" not in exports
    state = stack.state()
    assert_no_secrets(env.stdout, [state["app_password"], state["superuser_password"]])

    # The Makefile's recipe with this interpreter's bin/ (and no reinstall of the venv).
    status = subprocess.run(
        ["make", "-s", "status", f"BIN={BIN}", f"LOCAL_STAMP={sys.executable}"],
        cwd=ROOT,
        env=_stack_env(stack.local_dir),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    lines = status.stdout.splitlines()
    assert lines[0] == (
        f"# state of the running service, from the rotation history in 127.0.0.1:{state['pg_port']}/comm_ng "
        "(not this process)"
    )
    assert lines[1] == f"secret      {state['secret_arn']}"
    assert lines[2].startswith("AWSCURRENT  ")
    assert status.stderr == ""
    assert_no_secrets(
        status.stdout, [state["app_password"], state["superuser_password"], state["admin_token"]]
    )


def test_only_gunicorn_workers_write_into_the_metrics_directory(stack: RunningStack) -> None:
    workers = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", stack.log())}
    assert len(workers) == 2  # gunicorn.conf.py's default; no worker was restarted
    files = list((stack.local_dir / "prometheus").iterdir())
    assert files
    assert {int(f.stem.rsplit("_", 1)[1]) for f in files} == workers  # no migration, no CLI

    token = stack.state()["admin_token"]  # /metrics is private by default
    metrics = requests.get(
        f"{stack.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).text
    assert re.search(r'^commng_db_engines\{state="active"\} 2\.0$', metrics, re.MULTILINE), metrics
