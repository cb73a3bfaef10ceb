"""`make switchover` and `make failover` under load, on the local stack a user runs.

One `python -m devstack run` (a primary, a synchronous hot standby, the endpoint that stands
for RDS's name, moto, gunicorn with two gevent workers): a Blue/Green switchover under load,
then `make rotate` on the new primary; the stack is restarted, which makes the promoted
server the primary and a new standby from it; then a crash failover under load. Clients
retry a 503 once with the same Idempotency-Key, as the README tells them to. For each move:
no request failed, every acknowledged write is on the new primary (none lost), and no
message is there twice (none duplicated).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack import PostgresCluster, free_port
from devstack.processes import LoadGenerator
from tests.helpers import adopted, assert_no_secrets, wait_for
from tests.localstack import (
    RunningStack,
    assert_stopped,
    current,
    devstack,
    new_local_dir,
    passwords,
    start_stack,
)

pytestmark = pytest.mark.e2e

ENV = {"LOG_FORMAT": "json", "DB_SECRET_REFRESH_INTERVAL_MS": "1000"}


@pytest.fixture
def local_dir() -> Iterator[Path]:
    path = new_local_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(local_dir: Path, port: int) -> RunningStack:
    log = (local_dir / "run.log").open("ab")
    process = start_stack(local_dir, port, log, env=ENV)
    log.close()
    running = RunningStack(process, local_dir, port)
    assert process.poll() is None, running.log()[-3000:]
    return running


def _stop(running: RunningStack) -> None:
    if running.process.poll() is None:
        os.killpg(running.process.pid, signal.SIGINT)  # Ctrl-C
    running.process.wait(90)


def _where(running: RunningStack) -> list[str]:
    result = devstack(running.local_dir, "where")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _move_under_load(running: RunningStack, *move: str) -> tuple[LoadGenerator, str]:
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


def _assert_every_write_once(running: RunningStack, load: LoadGenerator) -> None:
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


def test_a_switchover_then_a_failover_fail_no_request_and_lose_or_repeat_no_write(local_dir: Path) -> None:
    port = free_port()
    running = _run(local_dir, port)
    try:
        state = running.state()
        assert _where(running)[0].endswith(f"serves 127.0.0.1:{state['pg_port']}, the primary")

        load, out = _move_under_load(running, "switchover", "--read-only", "1")
        assert "green is promoted and the endpoint points at it" in out
        _assert_every_write_once(running, load)
        assert _where(running)[0].endswith(
            f"serves 127.0.0.1:{state['standby_port']}, the standby promoted by make switchover"
        )
        # Another move needs a standby, which the next make run makes.
        refused = devstack(local_dir, "failover")
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            "the standby was already promoted (make switchover): restart make run to have a new standby"
        ]
        # make rotate works on the new primary, and both workers adopt the new login.
        assert "3/3 AWSCURRENT moved" in running.rotate()
        version, _ = current(running.state(), "app")
        running.wait_for(lambda: len(adopted(running.log(), version)) == 2, timeout_s=30)
        used = passwords(running.state())
        _stop(running)

        # The next run: the promoted server is the primary, with a new synchronous standby.
        running = _run(local_dir, port)
        assert "is the primary now" in running.log()
        state = running.state()
        where = _where(running)
        assert where[0].endswith(f"serves 127.0.0.1:{state['pg_port']}, the primary")
        assert where[1].startswith(f"standby     127.0.0.1:{state['standby_port']}, streaming, sync")

        load, out = _move_under_load(running, "failover", "--stale", "2")
        assert "the endpoint refuses connections for 2 s" in out
        _assert_every_write_once(running, load)
        assert "3/3 AWSCURRENT moved" in running.rotate()
        used += passwords(running.state())
    finally:
        _stop(running)
    assert_stopped(local_dir, port)
    assert_no_secrets(running.log() + "".join(running.outputs), used)
