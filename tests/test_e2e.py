"""End to end: gunicorn with 2 gevent workers under load through 3 realistic rotations.

The bar from the issue: 0 failed requests, every 201-created message reads back, the
backends settle at or below workers x pool after the grace period, and none of the
passwords used appears anywhere in gunicorn's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from devstack import free_port, new_password, rotate_secret
from devstack.processes import GunicornServer, LoadGenerator
from tests.helpers import Database, adopted, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

WORKERS = 2
POOL_SIZE = 4


def test_three_rotations_under_load_fail_no_request(
    database: Database, moto_endpoint: str, workdir: Path
) -> None:
    client, arn, env = database.watched_env(
        moto_endpoint, workdir, POSTGRES_POOL_SIZE=str(POOL_SIZE), DB_POOL_GRACE_PERIOD_MS="2000"
    )
    server = GunicornServer(env, free_port(), WORKERS, workdir / "gunicorn.log", monitor_blocking=True)
    passwords = [database.password]
    server.start()
    try:
        channels = [
            requests.post(f"{server.url}/api/channels", json={"name": f"ch-{i}"}, timeout=10).json()["id"]
            for i in range(3)
        ]
        load = LoadGenerator(server.url, channels, clients=8, max_s=120)
        load.start()
        try:
            for n in range(3):
                new = new_password()
                passwords.append(new)
                kill = (lambda: database.cluster.terminate_backends(database.role)) if n == 1 else None
                version = rotate_secret(
                    client, arn, database.cluster, database.role, new, 1.5, before_current=kill
                )
                wait_for(lambda v=version: len(adopted(server.output(), v)) == WORKERS, timeout_s=20)
        finally:
            result = load.stop()

        assert len(result.samples) > 100, "the load generator did not run"
        assert result.failures == [], "\n".join([*map(repr, result.failures[:5]), *server.problems()])
        # The pools, plus each worker's LISTEN connection (fan-out, on by default).
        wait_for(lambda: database.backends() <= WORKERS * (POOL_SIZE + 1), timeout_s=15)
        with requests.Session() as session:
            missing = [
                i
                for i in result.created_ids
                if session.get(f"{server.url}/api/messages/{i}", timeout=10).status_code != 200
            ]
        assert result.created_ids
        assert missing == []
    finally:
        code = server.stop()
    assert code == 0
    assert server.process is not None
    assert server.process.poll() is not None
    output = server.output()
    assert '"Database connection successfully refreshed with new credentials"' in output
    assert '"Auto-refresh started"' in output
    assert "setup plugin" not in output  # alembic's boot chatter stays below WARNING
    assert_no_secrets(output, passwords)
    # No greenlet held a worker's event loop for more than 100 ms: not at start-up, not
    # while rotating, draining or writing the history.
    assert server.blocking_reports() == []
