"""A `python -m devstack run` of the tests' own: its .local, its commands, its log and state.

Shared by tests/test_devstack.py and tests/test_devstack_moves.py, which each run a stack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from devstack import PostgresCluster, secrets_client
from devstack.processes import LoadGenerator, http_status
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def new_local_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="commng-local-"))
    path.chmod(0o755)  # like a checkout's .local; the 0700 case falls back to /tmp
    return path


def stack_env(local_dir: Path) -> dict[str, str]:
    prefixes = ("POSTGRES_", "DB_SECRET", "AWS_ENDPOINT", "PROMETHEUS_", "ADMIN_TOKEN", "PORT", "LOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["COMMNG_LOCAL_DIR"] = str(local_dir)
    return env


def devstack(local_dir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        cwd=ROOT,
        env=stack_env(local_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_stack(
    local_dir: Path, port: int, log: IO[bytes], *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    stack = subprocess.Popen(
        [sys.executable, "-m", "devstack", "run", "--port", str(port), *args],
        cwd=ROOT,
        env={**stack_env(local_dir), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    ready = f"http://127.0.0.1:{port}/readyz"
    output = local_dir / "run.log"

    # Both workers: the first answers /readyz while the other may still boot, and a worker
    # that boots after a rotation never logs adopting it.
    def up() -> bool:
        return output.read_text(errors="replace").count("worker_ready") >= 2 and http_status(ready) == 200

    wait_for(lambda: stack.poll() is not None or up(), timeout_s=90)
    return stack


def assert_stopped(local_dir: Path, port: int) -> None:
    assert "local stack stopped" in (local_dir / "run.log").read_text()
    assert not (local_dir / "pg" / "data" / "postmaster.pid").exists()
    assert not (local_dir / "pg" / "standby" / "data" / "postmaster.pid").exists()
    assert http_status(f"http://127.0.0.1:{port}/healthz", timeout_s=1) is None


def secret_values(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every version of every secret of the stack, AWSPREVIOUS and older too."""
    client = secrets_client(state["endpoint"])
    values = []
    for arn in state["secrets"].values():
        versions = client.list_secret_version_ids(SecretId=arn, IncludeDeprecated=True)["Versions"]
        for version in versions:
            got = client.get_secret_value(SecretId=arn, VersionId=version["VersionId"])
            values.append(json.loads(got["SecretString"]))
    return values


def passwords(state: dict[str, Any]) -> list[str]:
    """Every password a secret of the stack ever held, and the superuser's."""
    return [state["superuser_password"], *(value["password"] for value in secret_values(state))]


def current(state: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """(AWSCURRENT version id, value) of the stack's secret ``name``."""
    got = secrets_client(state["endpoint"]).get_secret_value(
        SecretId=state["secrets"][name], VersionStage="AWSCURRENT"
    )
    return got["VersionId"], json.loads(got["SecretString"])


@dataclass
class RunningStack:
    process: subprocess.Popen[bytes]
    local_dir: Path
    port: int
    outputs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.local_dir / "run.log").read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.local_dir / "stack.json").read_text())
        return state

    def rotate(self, *args: str) -> str:
        """`make rotate` with ``args``; its output, which must hold no password."""
        result = devstack(self.local_dir, "rotate", *args, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        self.outputs.append(result.stdout + result.stderr)
        return result.stdout

    def wait_for(self, predicate: Callable[[], object], timeout_s: float) -> None:
        """tests.helpers.wait_for, failing with the stack's last log lines (but the access log)."""
        try:
            wait_for(predicate, timeout_s=timeout_s)
        except AssertionError as exc:
            lines = [line for line in self.log().splitlines() if '"http_request"' not in line]
            raise AssertionError("\n".join([str(exc), *lines[-40:]])) from None

    def metrics(self) -> str:
        token = self.state()["metrics_token"]  # /metrics is private by default, not the admin token's
        headers = {"Authorization": f"Bearer {token}"}
        return requests.get(f"{self.url}/metrics", headers=headers, timeout=10).text


# -- failover and switchover under load (tests/test_devstack_moves.py, test_devstack_iam.py) --

MOVE_ENV = {"LOG_FORMAT": "json", "DB_SECRET_REFRESH_INTERVAL_MS": "1000"}


def run_stack(local_dir: Path, port: int, *args: str) -> RunningStack:
    """`python -m devstack run` with ``args``, JSON logs and a 1 s poll, appending to run.log."""
    log = (local_dir / "run.log").open("ab")
    process = start_stack(local_dir, port, log, *args, env=MOVE_ENV)
    log.close()
    running = RunningStack(process, local_dir, port)
    assert process.poll() is None, running.log()[-3000:]
    return running


def ctrl_c(running: RunningStack) -> None:
    """Ctrl-C to the stack's process group, as in its terminal; waits for it to end."""
    if running.process.poll() is None:
        os.killpg(running.process.pid, signal.SIGINT)  # Ctrl-C
    running.process.wait(90)


def where(running: RunningStack) -> list[str]:
    """`python -m devstack where`: which server the endpoint serves, and the standby."""
    result = devstack(running.local_dir, "where")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def move_under_load(running: RunningStack, *move: str) -> tuple[LoadGenerator, str]:
    """Load with keys and one retry of a 503; ``move`` in the middle; (the load, the move's output)."""
    channel = requests.post(f"{running.url}/api/channels", json={"name": move[0]}, timeout=10).json()["id"]
    load = LoadGenerator(running.url, [channel], clients=4, max_s=120, keys=True, retry_503=True)
    load.start()
    try:
        wait_for(lambda: len(load.result.created_ids) >= 20, timeout_s=30)
        moved = devstack(running.local_dir, *move, timeout=120)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        running.outputs.append(moved.stdout + moved.stderr)
        after = len(load.result.created_ids)
        wait_for(lambda: len(load.result.created_ids) >= after + 40, timeout_s=30)  # writes go on
    finally:
        load.stop()
    return load, moved.stdout


def assert_every_write_once(running: RunningStack, load: LoadGenerator) -> None:
    """Every acknowledged id is on the endpoint's primary (none lost); no body twice (none duplicated)."""
    result, tag = load.result, load.tag
    assert result.failures == [], [*map(repr, result.failures[:5])]
    state = running.state()
    primary = PostgresCluster(running.local_dir, state["endpoint_port"], state["superuser_password"])
    rows = primary.execute(
        "SELECT id, body FROM messages WHERE body LIKE %s", (f"{tag} %",), dbname="comm_ng"
    )
    stored = {row[0] for row in rows}
    lost = set(result.created_ids) - stored
    duplicated = len(rows) - len({row[1] for row in rows})
    assert (len(lost), duplicated) == (0, 0), (sorted(lost)[:10], duplicated)


def make_status(local_dir: Path) -> str:
    """`make status` on the stack of ``local_dir`` with this interpreter's bin/ (no venv rebuild)."""
    status = subprocess.run(
        ["make", "-s", "status", f"BIN={BIN}", f"LOCAL_STAMP={sys.executable}"],
        cwd=ROOT,
        env=stack_env(local_dir),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stderr == ""
    return status.stdout
