"""A worker stopped with idle keep-alive clients still runs its cleanup (worker_exit).

gunicorn's gevent worker waits for every connection to go before it exits, and an idle
keep-alive connection (keepalive = 75 s) outlasts graceful_timeout (25 s): the master
then kills the worker, and stop_background (history flush, fleet row, pools) never runs.

A quick stop (a terminal's Ctrl-C: SIGINT to the master and the workers alike, then the
master's SIGQUIT to each worker) runs it too: the second quit signal used to cut it short.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from devstack import free_port, new_password, rotate_secret
from devstack.processes import GunicornServer
from tests.helpers import Database, adopted, wait_for

pytestmark = pytest.mark.e2e

KEEP_ALIVE_CLIENTS = 3


def _keep_alive_client(port: int) -> http.client.HTTPConnection:
    """A connection that made one request and stays open, idle (HTTP/1.1 keep-alive)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    assert response.getheader("Connection", "keep-alive").lower() != "close"
    return conn


def _writes_waiting(superuser: Any) -> int:
    """INSERTs into rotation_events waiting for the test's lock."""
    with superuser.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'rotation_events'::regclass"
        )
        return int(cur.fetchone()[0])


def _scalar(database: Database, query: str, *params: Any) -> int:
    rows = database.cluster.execute(query, params, dbname=database.name)
    return int(rows[0][0])


def test_a_stopped_worker_with_idle_keep_alive_clients_flushes_its_history(
    database: Database, moto_endpoint: str, workdir: Path
) -> None:
    client, arn, env = database.watched_env(moto_endpoint, workdir)
    server = GunicornServer(env, free_port(), 1, workdir / "gunicorn.log")
    superuser = database.cluster.connect(database.name)
    clients: list[http.client.HTTPConnection] = []
    server.start()
    try:
        clients = [_keep_alive_client(server.port) for _ in range(KEEP_ALIVE_CLIENTS)]
        # The history cannot be written: the rotation's event stays queued in the worker.
        superuser.autocommit = False
        with superuser.cursor() as cur:
            cur.execute("LOCK TABLE rotation_events IN ACCESS EXCLUSIVE MODE")
        version = rotate_secret(client, arn, database.cluster, database.role, new_password())
        wait_for(lambda: len(adopted(server.output(), version)) == 1, timeout_s=20)
        # Two failed writes (each waits out its statement timeout): the next is 2 s or more away.
        wait_for(lambda: server.output().count("rotation_history_write_failed") >= 2, timeout_s=30)
        wait_for(lambda: _writes_waiting(superuser) == 0, timeout_s=10)
        superuser.rollback()  # the table is free again, and at once the worker is told to stop

        started = time.monotonic()
        code = server.stop()
        stopped_s = time.monotonic() - started
    finally:
        server.stop()
        for conn in clients:
            conn.close()
        superuser.close()

    assert code == 0
    # stop_background ran: the queued event was written, the worker left the fleet table.
    assert _scalar(database, "SELECT count(*) FROM rotation_events WHERE new_version = %s", version) == 1
    assert _scalar(database, "SELECT count(*) FROM rotation_workers") == 0
    assert "Closing 3 idle keep-alive connection(s)" in server.output()
    # Generous: only proves it did not wait out graceful_timeout (25 s).
    assert stopped_s < 20, f"the worker took {stopped_s:.1f} s to stop"


def test_a_worker_quit_twice_as_by_ctrl_c_still_leaves_the_fleet(
    database: Database, moto_endpoint: str, workdir: Path
) -> None:
    _, _, env = database.watched_env(moto_endpoint, workdir)
    server = GunicornServer(env, free_port(), 1, workdir / "gunicorn.log")
    server.start()
    try:
        assert server.process is not None
        wait_for(lambda: _scalar(database, "SELECT count(*) FROM rotation_workers") == 1, timeout_s=20)
        (worker,) = re.findall(r"Booting worker with pid: (\d+)", server.output())
        # What a terminal's Ctrl-C does: SIGINT to every process of the foreground group.
        os.kill(int(worker), signal.SIGINT)
        os.kill(server.process.pid, signal.SIGINT)
        code = server.process.wait(30)
    finally:
        server.stop()

    assert code == 0
    output = server.output()
    assert "Handling signal: int" in output
    # stop_background ran to its end: the worker deleted its own row in the fleet table.
    assert _scalar(database, "SELECT count(*) FROM rotation_workers") == 0
    assert "failed with SystemExit" not in output
