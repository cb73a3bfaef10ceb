"""End to end: gunicorn with 2 gevent workers through 3 alternating-users rotations.

The secret switches between ``app_n`` and ``app_n_clone`` as Secrets Manager's
alternating-users rotation does; under light load no request fails, every created
message reads back, and no password appears in gunicorn's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from psycopg2 import sql

from devstack import free_port, new_password, rotate_alternating
from devstack.processes import GunicornServer, LoadGenerator
from tests.helpers import Database, adopted, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

WORKERS = 2


def test_three_alternating_rotations_under_load_fail_no_request(
    database: Database, moto_endpoint: str, workdir: Path
) -> None:
    clone = f"{database.role}_clone"
    database.cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
            sql.Identifier(clone), sql.Identifier(database.role)
        )
    )
    client, arn, env = database.watched_env(
        moto_endpoint, workdir, POSTGRES_POOL_SIZE="3", DB_POOL_GRACE_PERIOD_MS="2000"
    )
    server = GunicornServer(env, free_port(), WORKERS, workdir / "gunicorn.log", monitor_blocking=True)
    passwords = [database.password]
    server.start()
    try:
        channels = [
            requests.post(f"{server.url}/api/channels", json={"name": f"alt-{i}"}, timeout=10).json()["id"]
            for i in range(2)
        ]
        load = LoadGenerator(server.url, channels, clients=4, max_s=60)
        load.start()
        try:
            users = []
            for _ in range(3):
                password = new_password()
                passwords.append(password)
                version, user = rotate_alternating(client, arn, database.cluster, password)
                users.append(user)
                wait_for(lambda v=version: len(adopted(server.output(), v)) == WORKERS, timeout_s=20)
        finally:
            result = load.stop()

        assert users == [clone, database.role, clone]
        assert len(result.samples) > 50, "the load generator did not run"
        assert result.failures == [], "\n".join([*map(repr, result.failures[:5]), *server.problems()])
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
        database.cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(clone)))
    assert code == 0
    assert_no_secrets(server.output(), passwords)
    assert server.blocking_reports() == []  # no greenlet held a worker's loop > 100 ms
