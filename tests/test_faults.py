"""Bounded under every fault: gunicorn with gevent workers against a database that goes silent.

Each fault is made here, on this machine: a listener that accepts and never answers, a
real PostgreSQL frozen with SIGSTOP (the whole cluster, or only the postmaster during a
rotation), and a PostgreSQL that is stopped and started again. Every request and every
/readyz answers within its bound (503 JSON while the database cannot answer), no worker
dies, and everything recovers by itself. The bounds here are short so the tests are too:
POSTGRES_CONNECT_TIMEOUT_S=1, POSTGRES_STATEMENT_TIMEOUT_MS=1000, DB_OUTAGE_WAIT_MS=1500.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack import PostgresCluster, free_port, new_password, rotate_secret
from devstack.processes import GunicornServer, http_status
from tests.helpers import (
    Database,
    adopted,
    assert_no_secrets,
    cluster_pids,
    drop_database,
    frozen,
    migrated_cluster,
    new_database,
    postmaster_pid,
    silent_server,
    wait_for,
)

pytestmark = pytest.mark.e2e

BOUNDS = {
    "POSTGRES_CONNECT_TIMEOUT_S": "1",
    "POSTGRES_STATEMENT_TIMEOUT_MS": "1000",
    "DB_OUTAGE_WAIT_MS": "1500",
}
READY_BOUND_S = 2.0
# A request's database work: the outage budget plus one statement timeout.
REQUEST_BOUND_S = 1.5 + 1.0
# What the machine may add to a bound (scheduling, HTTP, gunicorn) before we call it a hang.
SLACK_S = 1.5
# On every request whose response the test keeps: a kept-alive connection still open at
# server.stop() holds its worker's graceful shutdown for graceful_timeout (25 s).
CLOSE = {"Connection": "close"}


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    """A migrated cluster of this module's own, which its tests freeze and restart."""
    with migrated_cluster("commng-pg-faults-") as cluster:
        yield cluster


@pytest.fixture
def own_database(own_cluster: PostgresCluster) -> Iterator[Database]:
    db = new_database(own_cluster)
    yield db
    drop_database(db)


def _timed(method: str, url: str, **kwargs: Any) -> tuple[requests.Response, float]:
    """One request with a client timeout far past every bound: a hang fails the test."""
    started = time.monotonic()
    response = requests.request(method, url, timeout=30, headers=CLOSE, **kwargs)
    return response, time.monotonic() - started


def _worker_boots(server: GunicornServer) -> int:
    return server.output().count("Booting worker")


def _assert_unavailable(response: requests.Response, seconds: float, bound_s: float) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert seconds <= bound_s + SLACK_S, f"answered after {seconds:.1f} s, bound {bound_s} s"


def test_a_server_that_never_answers_gets_503s_within_bounds(workdir: Path) -> None:
    with silent_server() as port:
        env = {
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(port),
            "POSTGRES_DB": "none",
            "POSTGRES_USER": "nobody",
            "POSTGRES_PASSWORD": "never-sent-0123",
            "POSTGRES_SSL": "disable",
            "LOG_FORMAT": "json",
            **BOUNDS,
        }
        server = GunicornServer(env, free_port(), 1, workdir / "gunicorn.log")
        server.start(ready=False)
        try:
            boots = _worker_boots(server)
            ready, ready_s = _timed("GET", f"{server.url}/readyz")
            _assert_unavailable(ready, ready_s, READY_BOUND_S)
            listing, listing_s = _timed("GET", f"{server.url}/api/channels")
            _assert_unavailable(listing, listing_s, REQUEST_BOUND_S)
            assert listing.json()["error"]["code"] == "database_unavailable"
            assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
            assert _worker_boots(server) == boots, "a worker died and was replaced"
            print(f"silent server: /readyz {ready_s:.2f} s, /api/channels {listing_s:.2f} s")
        finally:
            server.stop()
    assert "never-sent-0123" not in server.output()


def test_a_frozen_cluster_gets_503s_within_bounds_then_recovers(
    own_database: Database, workdir: Path
) -> None:
    server = GunicornServer(own_database.env(**BOUNDS), free_port(), 2, workdir / "gunicorn.log")
    server.start()
    try:
        created = requests.post(
            f"{server.url}/api/channels", json={"name": "before-freeze"}, headers=CLOSE, timeout=10
        )
        assert created.status_code == 201, server.problems()
        boots = _worker_boots(server)
        with frozen(cluster_pids(own_database.cluster)):
            ready, ready_s = _timed("GET", f"{server.url}/readyz")
            _assert_unavailable(ready, ready_s, READY_BOUND_S)
            posted, posted_s = _timed("POST", f"{server.url}/api/channels", json={"name": "during"})
            _assert_unavailable(posted, posted_s, REQUEST_BOUND_S)
            listing, listing_s = _timed("GET", f"{server.url}/api/channels")
            _assert_unavailable(listing, listing_s, REQUEST_BOUND_S)
        wait_for(lambda: http_status(f"{server.url}/readyz") == 200, timeout_s=15)
        names = [c["name"] for c in requests.get(f"{server.url}/api/channels", timeout=10).json()["channels"]]
        assert "before-freeze" in names
        assert _worker_boots(server) == boots, "a worker died and was replaced"
        print(f"frozen cluster: /readyz {ready_s:.2f} s, POST {posted_s:.2f} s, GET {listing_s:.2f} s")
    finally:
        server.stop()
    assert_no_secrets(server.output(), [own_database.password])


def test_a_frozen_postmaster_during_a_rotation_bounds_every_answer_then_adopts(
    own_database: Database, moto_endpoint: str, workdir: Path
) -> None:
    client, arn, env = own_database.watched_env(moto_endpoint, workdir, **BOUNDS)
    server = GunicornServer(env, free_port(), 1, workdir / "gunicorn.log")
    server.start()
    new = new_password()
    try:
        channel = requests.post(f"{server.url}/api/channels", json={"name": "rotating"}, timeout=10).json()
        boots = _worker_boots(server)
        postmaster = postmaster_pid(own_database.cluster)
        try:
            # ALTER ROLE runs, then the postmaster freezes, then AWSCURRENT moves: the
            # worker must build its new pool while no new connection can be made.
            version = rotate_secret(
                client,
                arn,
                own_database.cluster,
                own_database.role,
                new,
                before_current=lambda: os.kill(postmaster, signal.SIGSTOP),
            )
            wait_for(lambda: '"refresh_failed"' in server.output(), timeout_s=20)
            # An idle backend of the old pool still serves (200); a request that needs a new
            # connection (the history and fleet writers may hold the idle ones) cannot have
            # one: it answers 503 JSON within its bound instead of hanging.
            read, read_s = _timed("GET", f"{server.url}/api/channels/{channel['id']}/messages")
            assert read.status_code in (200, 503), read.text
            assert read.headers["Content-Type"].startswith("application/json")
            assert read_s <= REQUEST_BOUND_S + SLACK_S
        finally:
            os.kill(postmaster, signal.SIGCONT)
        wait_for(lambda: bool(adopted(server.output(), version)), timeout_s=20)
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
        assert _worker_boots(server) == boots
    finally:
        server.stop()
    assert_no_secrets(server.output(), [own_database.password, new])


def test_a_restart_is_waited_out_without_a_failed_request(own_database: Database, workdir: Path) -> None:
    env = own_database.env(
        **{**BOUNDS, "DB_OUTAGE_WAIT_MS": "20000", "POSTGRES_STATEMENT_TIMEOUT_MS": "5000"}
    )
    server = GunicornServer(env, free_port(), 1, workdir / "gunicorn.log")
    server.start()
    cluster = own_database.cluster
    try:
        answers: list[requests.Response] = []
        cluster.stop("fast")
        request = threading.Thread(
            target=lambda: answers.append(
                requests.post(
                    f"{server.url}/api/channels", json={"name": "through-restart"}, headers=CLOSE, timeout=60
                )
            )
        )
        request.start()
        # The request is waiting out the outage once the worker says so; then the database returns.
        wait_for(lambda: "database_connect_retrying" in server.output(), timeout_s=15)
        ready_during, ready_s = _timed("GET", f"{server.url}/readyz")
        _assert_unavailable(ready_during, ready_s, READY_BOUND_S)
        cluster.start()
        request.join(60)
        assert [a.status_code for a in answers] == [201], [a.text for a in answers]
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    finally:
        if not (cluster.datadir / "postmaster.pid").exists():
            cluster.start()
        server.stop()
