"""Host names are resolved by the layer, not by libpq: cooperatively, within the connect's
bound, again for every new connection, and handed to libpq as ``hostaddr``.

A name that only this process's resolver knows proves libpq never resolved it (it could
not have); a resolver that stalls, under gevent in a subprocess, proves the lookup is
bounded and the rest of the worker runs meanwhile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from flask import Flask

from commng_rotation import get_runtime
from devstack.processes import ROOT
from tests.helpers import Database

NAME = "db.commng.test"  # the reserved .test domain: no resolver but ours answers it


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """socket.getaddrinfo answers NAME with 127.0.0.1 (only here); each lookup is recorded."""
    real = socket.getaddrinfo
    seen: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(host))
        return real("127.0.0.1" if host == NAME else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


def test_a_name_is_resolved_here_and_libpq_gets_the_address(
    database: Database, make_app: Any, lookups: list[str]
) -> None:
    app: Flask = make_app(database.settings(postgres_host=NAME))
    client = app.test_client()
    assert client.post("/api/channels", json={"name": "by-name"}).status_code == 201
    assert NAME in lookups
    # Every new connection resolves again: a failover's new address is used at once.
    before = lookups.count(NAME)
    engine = get_runtime(app).rotator().active.engine  # type: ignore[union-attr]
    engine.dispose()
    assert client.get("/api/channels").status_code == 200
    assert lookups.count(NAME) == before + 1


def test_the_rotation_listener_resolves_the_name_here_too(
    database: Database, secretsmanager: Any, secret: str, make_app: Any, lookups: list[str]
) -> None:
    """The fan-out's LISTEN connection is not one of the pools': libpq must not resolve it either."""
    settings = database.settings(
        postgres_host=NAME, db_secret_id=secret, postgres_user=None, postgres_password=None
    )
    app: Flask = make_app(settings, secrets_client=secretsmanager)
    fanout = get_runtime(app).fanout
    assert fanout is not None
    before = lookups.count(NAME)
    fanout.connect()
    assert fanout.connected
    assert lookups.count(NAME) == before + 1


def test_a_name_that_does_not_resolve_is_waited_out_then_503(database: Database, make_app: Any) -> None:
    app: Flask = make_app(database.settings(postgres_host="nowhere.commng.test", db_outage_wait_ms=300))
    response = app.test_client().get("/api/channels")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"


STALLED_RESOLVER = """
from gevent import monkey
monkey.patch_all()
import socket, time
import gevent
from commng_rotation.resolve import with_hostaddr

def stalled(host, port, *args, **kwargs):  # a resolver that answers in 8 s
    gevent.sleep(8)
    return []

socket.getaddrinfo = stalled
ticks = []
beat = gevent.spawn(lambda: [ticks.append(time.monotonic()) or gevent.sleep(0.05) for _ in range(1000)])
started = time.monotonic()
try:
    with_hostaddr({"host": "db.commng.test", "port": 5432}, 1.0)
except Exception as exc:
    print(type(exc).__name__, round(time.monotonic() - started, 2), len(ticks))
beat.kill()
"""


def test_a_stalled_lookup_is_bounded_and_the_worker_runs_meanwhile() -> None:
    run = subprocess.run(
        [sys.executable, "-c", STALLED_RESOLVER],
        env={**os.environ, "PYTHONPATH": str(ROOT / "rotation" / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    name, elapsed, ticks = run.stdout.split()
    assert name == "OperationalError"  # libpq's words: "could not translate host name"
    assert 0.9 <= float(elapsed) < 3.0  # the bound, not the resolver's 8 s
    assert int(ticks) >= 10  # another greenlet ran every 50 ms meanwhile
