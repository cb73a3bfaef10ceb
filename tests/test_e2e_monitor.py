"""No greenlet holds a worker's loop through rotations under load (gevent's monitor thread).

gevent's monitor (``GEVENT_MONITOR_THREAD_ENABLE``) reports any greenlet that keeps the
loop longer than ``GEVENT_MAX_BLOCKING_TIME``: a blocking C call, a lookup, a long
render. At 100 ms; below that a loaded 2-core machine's scheduling noise sets it off.
A route that does block is the control: the monitor is on in the workers and reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from devstack import free_port, new_password, rotate_secret
from devstack.processes import GunicornServer, LoadGenerator
from tests.helpers import Database, adopted, wait_for

pytestmark = pytest.mark.e2e

WORKERS = 2
BLOCKED = "appears to be blocked"
MONITOR = {"GEVENT_MONITOR_THREAD_ENABLE": "1", "GEVENT_MAX_BLOCKING_TIME": "0.1"}


def test_rotations_under_load_never_block_a_workers_loop(
    database: Database, moto_endpoint: str, workdir: Path
) -> None:
    client, arn, env = database.watched_env(moto_endpoint, workdir, DB_POOL_GRACE_PERIOD_MS="2000", **MONITOR)
    log = workdir / "gunicorn.log"
    server = GunicornServer(env, free_port(), WORKERS, log, app="tests.blocking_wsgi:app")
    server.start()
    try:
        channels = [
            requests.post(f"{server.url}/api/channels", json={"name": f"ch-{i}"}, timeout=10).json()["id"]
            for i in range(2)
        ]
        load = LoadGenerator(server.url, channels, clients=6, max_s=120)
        load.start()
        try:
            for n in range(2):
                kill = (lambda: database.cluster.terminate_backends(database.role)) if n == 1 else None
                version = rotate_secret(
                    client, arn, database.cluster, database.role, new_password(), 1.0, before_current=kill
                )
                wait_for(lambda v=version: len(adopted(server.output(), v)) == WORKERS, timeout_s=20)
        finally:
            result = load.stop()
        assert len(result.samples) > 50, "the load generator did not run"
        assert result.failures == [], "\n".join([*map(repr, result.failures[:5]), *server.problems()])
        reports = server.output().count(BLOCKED)

        # The control: a route that holds the loop 0.3 s is reported.
        answer = requests.get(f"{server.url}/test/block", headers={"Connection": "close"}, timeout=10)
        assert answer.status_code == 200
        wait_for(lambda: server.output().count(BLOCKED) > reports, timeout_s=10)
    finally:
        server.stop()
    assert reports == 0, server.output()[server.output().find(BLOCKED) - 2000 :][:6000]
