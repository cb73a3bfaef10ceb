"""Fan-out over LISTEN/NOTIFY: two apps on one database and one secret, real PostgreSQL and moto."""

from __future__ import annotations

import json
import select
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from psycopg2 import sql

from commng_rotation import Trigger
from commng_rotation.fanout import FanOut
from commng_rotation.runtime import Runtime, get_runtime
from devstack import new_password, rotate_secret
from tests.helpers import Database, assert_no_secrets, wait_for


@pytest.fixture
def pair(database: Database, secretsmanager: Any, secret: str, make_app: Any) -> tuple[Runtime, Runtime]:
    """Two apps (two workers) on the same database and secret; the second one listens."""
    settings = database.settings(db_secret_id=secret, postgres_user=None, postgres_password=None)
    first: Flask = make_app(settings, secrets_client=secretsmanager)
    second: Flask = make_app(settings, secrets_client=secretsmanager)
    listener = _fanout(get_runtime(second))
    listener.start()
    wait_for(lambda: listener.connected, timeout_s=10)
    return get_runtime(first), get_runtime(second)


@pytest.fixture
def observer(database: Database) -> Iterator[Any]:
    """A superuser connection listening on the channel, to read the payloads themselves."""
    conn = database.cluster.connect(database.name)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier("commng_rotation")))
    yield conn
    conn.close()


def _fanout(runtime: Runtime) -> FanOut:
    assert runtime.fanout is not None
    return runtime.fanout


def _version(runtime: Runtime) -> str | None:
    current = runtime.rotator().current
    return current.version_id if current else None


def _rotate(database: Database, secretsmanager: Any, secret: str) -> tuple[str, str]:
    password = new_password()
    return rotate_secret(secretsmanager, secret, database.cluster, database.role, password), password


def _payloads(conn: Any) -> list[dict[str, Any]]:
    if select.select([conn], [], [], 0.05)[0]:
        conn.poll()
    found = [json.loads(n.payload) for n in conn.notifies]
    conn.notifies.clear()
    return found


def test_a_worker_that_adopts_tells_the_other_which_adopts_with_trigger_notify(
    pair: tuple[Runtime, Runtime], database: Database, secretsmanager: Any, secret: str, observer: Any
) -> None:
    first, second = pair
    version, password = _rotate(database, secretsmanager, secret)

    first.watcher.check_once()  # type: ignore[union-attr]  # the poll of one worker sees it

    wait_for(lambda: _version(second) == version, timeout_s=10)
    event = second.events.recent(1)[0]
    assert (event.trigger, event.outcome, event.new_version) == (Trigger.NOTIFY, "rotated", version)
    wait_for(lambda: _fanout(first).sent == 1, timeout_s=5)
    assert _fanout(second).sent == 0  # a worker that learnt by notification does not echo it
    payloads: list[dict[str, Any]] = []
    wait_for(lambda: payloads.extend(_payloads(observer)) or payloads, timeout_s=5)
    assert payloads == [{"bind": None, "version": version, "worker": event.worker, "stage": "AWSCURRENT"}]
    assert_no_secrets(json.dumps(payloads), [database.password, password])


def test_a_notification_for_a_version_in_use_or_malformed_runs_no_check(
    pair: tuple[Runtime, Runtime], database: Database
) -> None:
    _, second = pair
    fanout = _fanout(second)
    in_use = json.dumps({"bind": None, "version": _version(second), "worker": "x:1"})
    assert fanout.handle(in_use) == "in_use"
    assert fanout.handle(json.dumps({"bind": "reports", "version": "v2"})) == "other_bind"
    for junk in ["", "[]", '{"bind": null}', '{"version": 5}']:
        assert fanout.handle(junk) == "malformed"
    assert second.watcher is not None
    assert second.watcher.last_check_at is None
    # A version AWSCURRENT does not hold (AWSPENDING adopted in the window) is checked once.
    pending = json.dumps({"bind": None, "version": "not-current", "worker": "x:1"})
    assert fanout.handle(pending) == "checked"
    assert fanout.handle(pending) == "already_checked"


def test_a_listener_whose_backend_died_reconnects_and_adopts_the_next_rotation(
    pair: tuple[Runtime, Runtime], database: Database, secretsmanager: Any, secret: str
) -> None:
    first, second = pair
    listener = _fanout(second)
    one, _ = _rotate(database, secretsmanager, secret)
    first.watcher.check_once()  # type: ignore[union-attr]
    wait_for(lambda: _version(second) == one, timeout_s=10)

    killed = database.cluster.terminate_backends(database.role)  # the listeners are idle backends
    assert killed >= 2
    wait_for(lambda: listener.reconnects >= 1 and listener.connected, timeout_s=10)

    two, _ = _rotate(database, secretsmanager, secret)
    first.watcher.check_once()  # type: ignore[union-attr]
    wait_for(lambda: _version(second) == two, timeout_s=10)
    # Usually the NOTIFY; but a connection the second app opens inside the rotation window
    # (its fleet row is written 2 s after the catch-up check) may learn it first, from 28P01.
    assert second.events.recent(1)[0].trigger in {Trigger.NOTIFY, Trigger.AUTH_FAILURE}
    assert listener.connected


def test_a_listener_that_comes_back_after_a_rotation_logs_in_with_the_new_password(
    pair: tuple[Runtime, Runtime], database: Database, secretsmanager: Any, secret: str
) -> None:
    """Killed, then the password changes before it reconnects: the reactive refresh finds the login."""
    _, second = pair
    listener = _fanout(second)
    listener.stop()  # reconnect by hand, at a moment of the test's choosing
    version, _ = _rotate(database, secretsmanager, secret)
    database.cluster.terminate_backends(database.role)

    listener.connect()

    assert listener.connected
    assert _version(second) == version
    assert second.events.recent(1)[0].trigger == Trigger.AUTH_FAILURE
