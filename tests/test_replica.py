"""Reads from a real hot standby (pg_basebackup -R -X stream of the suite's cluster).

The read-only routes read from the ``replica`` bind, which has its own rotator; a replica
that is stopped, refuses the login or lags is skipped for the primary, and a message not
yet replayed is asked of the primary, so no request fails and a write reads back at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from psycopg2 import sql

from commng.db import ReplicaState, db, replica_state
from commng_rotation.runtime import get_runtime
from commng_rotation.xid import XidConnection
from config import Settings
from devstack import PostgresCluster, new_password, rotate_secret
from tests.helpers import Database, assert_no_secrets, wait_for

TOKEN = "replica-admin-token-0123456789"


def _on_standby(standby: PostgresCluster, query: str, *params: object) -> bool:
    try:
        return bool(standby.execute(query, params))
    except Exception:  # the standby restarting
        return False


def _settings(database: Database, standby: PostgresCluster, secret: str, **overrides: Any) -> Settings:
    wait_for(lambda: _on_standby(standby, "SELECT 1 FROM pg_database WHERE datname = %s", database.name))
    return database.settings(
        db_secret_id=secret,
        postgres_user=None,
        postgres_password=None,
        postgres_replica_host="127.0.0.1",
        postgres_replica_port=standby.port,
        **overrides,
    )


def _state(app: Flask) -> ReplicaState:
    state = replica_state(app)
    assert state is not None
    return state


def _get(app: Flask, path: str) -> Any:
    response = app.test_client().get(path)
    assert response.status_code == 200, (path, response.json)
    return response.json


def _post(app: Flask, path: str, body: dict[str, Any]) -> int:
    response = app.test_client().post(path, json=body)
    assert response.status_code == 201, response.json
    created: int = response.json["id"]
    return created


def test_reads_come_from_the_replica_and_a_write_reads_back_at_once(
    database: Database, standby: PostgresCluster, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    app = make_app(_settings(database, standby, secret, admin_token=TOKEN), secrets_client=secretsmanager)
    assert [b["bind"] for b in get_runtime(app).status()["binds"]] == [None, "replica"]
    channel = _post(app, "/api/channels", {"name": "replicated"})
    for n in range(20):
        message = _post(app, f"/api/channels/{channel}/messages", {"body": f"m{n}"})
        assert _get(app, f"/api/messages/{message}")["body"] == f"m{n}"
    wait_for(lambda: len(_get(app, f"/api/channels/{channel}/messages")["messages"]) == 20)
    assert [c["id"] for c in _get(app, "/api/channels")["channels"]] == [channel]
    state = _state(app)
    assert state.reads["replica"] >= 21
    assert state.reason is None
    seen = standby.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'commng-replica' AND datname = %s",
        (database.name,),
    )
    assert seen[0][0] >= 1
    status = app.test_client().get("/admin/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).json
    assert [b["bind"] for b in status["binds"]] == [None, "replica"]
    assert status["replica_reads"]["reading"] is True
    assert status["replica_reads"]["reads"]["replica"] >= 21
    for rotator in get_runtime(app).rotators.values():  # both binds note COMMITs, no engine events
        assert rotator.active is not None
        assert rotator.active.engine._has_events is False
        with rotator.active.engine.connect() as conn:
            assert isinstance(conn.connection.dbapi_connection, XidConnection)


@pytest.fixture
def reader(database: Database, standby: PostgresCluster) -> Iterator[tuple[str, str]]:
    """A login of its own for the replica, granted the app role; (name, password)."""
    name, password = f"{database.role}_reader", new_password()
    database.cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
            sql.Identifier(name), sql.Literal(password), sql.Identifier(database.role)
        )
    )
    wait_for(lambda: _on_standby(standby, "SELECT 1 FROM pg_roles WHERE rolname = %s", name))
    yield name, password
    database.cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_replica_secret_rotates_while_the_primary_secret_does_not(
    database: Database,
    standby: PostgresCluster,
    secretsmanager: Any,
    secret: str,
    make_app: Any,
    reader: tuple[str, str],
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO)
    name, password = reader
    replica_arn = secretsmanager.create_secret(
        Name=f"replica/{database.name}", SecretString=json.dumps({"username": name, "password": password})
    )["ARN"]
    settings = _settings(database, standby, secret, db_replica_secret_id=replica_arn)
    app = make_app(settings, secrets_client=secretsmanager)
    runtime = get_runtime(app)
    primary_version = runtime.rotator().current.version_id  # type: ignore[union-attr]
    _post(app, "/api/channels", {"name": "before"})
    wait_for(lambda: len(_get(app, "/api/channels")["channels"]) == 1)
    served = _state(app).reads["replica"]

    new = new_password()
    version = rotate_secret(secretsmanager, replica_arn, database.cluster, name, new)
    watcher = runtime.watcher
    assert watcher is not None

    def adopted() -> bool:
        watcher.check_once()
        current = runtime.rotator("replica").current
        return current is not None and current.version_id == version

    wait_for(adopted)  # the probe succeeds once the standby replayed the ALTER ROLE
    assert runtime.rotator().current.version_id == primary_version  # type: ignore[union-attr]
    replica_events = [e for e in runtime.events.recent(20) if e.bind == "replica" and e.outcome == "rotated"]
    assert [e.new_version for e in replica_events] == [version]
    standby.terminate_backends(name, idle_only=False)  # every read logs in anew, with the new password
    assert len(_get(app, "/api/channels")["channels"]) == 1
    assert _state(app).reads["replica"] > served
    assert_no_secrets(caplog.text, [password, new, database.password])


def test_a_replica_that_refuses_the_login_sends_reads_to_the_primary(
    database: Database,
    standby: PostgresCluster,
    secretsmanager: Any,
    secret: str,
    make_app: Any,
    reader: tuple[str, str],
) -> None:
    name, password = reader
    replica_arn = secretsmanager.create_secret(
        Name=f"replica/{database.name}", SecretString=json.dumps({"username": name, "password": password})
    )["ARN"]
    app = make_app(
        _settings(database, standby, secret, db_replica_secret_id=replica_arn), secrets_client=secretsmanager
    )
    channel = _post(app, "/api/channels", {"name": "refused"})
    wait_for(lambda: len(_get(app, "/api/channels")["channels"]) == 1)
    state = _state(app)
    database.cluster.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(name)))
    wait_for(
        lambda: _on_standby(standby, "SELECT 1 FROM pg_roles WHERE rolname = %s AND NOT rolcanlogin", name)
    )
    standby.terminate_backends(name, idle_only=False)
    primary = state.reads["primary"]
    for n in range(5):
        message = _post(app, f"/api/channels/{channel}/messages", {"body": f"m{n}"})
        assert _get(app, f"/api/messages/{message}")["id"] == message
        assert len(_get(app, "/api/channels")["channels"]) == 1
    assert state.reads["primary"] >= primary + 10
    assert state.reason is not None


def test_a_lagging_replica_is_skipped(
    database: Database, standby: PostgresCluster, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    app = make_app(
        _settings(database, standby, secret, db_replica_max_lag_ms=200), secrets_client=secretsmanager
    )
    channel = _post(app, "/api/channels", {"name": "lag"})
    wait_for(lambda: len(_get(app, "/api/channels")["channels"]) == 1)
    state = _state(app)
    standby.execute("SELECT pg_wal_replay_pause()")
    try:
        message = _post(app, f"/api/channels/{channel}/messages", {"body": "written while paused"})

        def lagging() -> bool:
            _get(app, f"/api/channels/{channel}/messages")
            return state.lagging

        wait_for(lagging)
        primary = state.reads["primary"]
        assert [m["id"] for m in _get(app, f"/api/channels/{channel}/messages")["messages"]] == [message]
        assert state.reads["primary"] == primary + 1
        assert state.reason == "replication lag"
    finally:
        standby.execute("SELECT pg_wal_replay_resume()")
    wait_for(lambda: _get(app, "/api/channels") is not None and not state.lagging)


def test_a_stopped_replica_sends_reads_to_the_primary_and_none_fails(
    database: Database, standby: PostgresCluster, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    app = make_app(_settings(database, standby, secret), secrets_client=secretsmanager)
    channel = _post(app, "/api/channels", {"name": "outage"})
    wait_for(lambda: len(_get(app, "/api/channels")["channels"]) == 1)
    state = _state(app)
    standby.stop("fast")
    try:
        before = state.reads["replica"]
        for n in range(10):
            message = _post(app, f"/api/channels/{channel}/messages", {"body": f"m{n}"})
            assert _get(app, f"/api/messages/{message}")["id"] == message
            assert len(_get(app, f"/api/channels/{channel}/messages")["messages"]) == n + 1
            assert len(_get(app, "/api/channels")["channels"]) == 1
        assert state.reads["replica"] == before
        assert state.reason == "connection refused"
    finally:
        standby.start()

    def back() -> bool:
        _get(app, "/api/channels")
        return state.reads["replica"] > before

    wait_for(back, timeout_s=20)
    assert state.reason is None


def test_a_read_that_began_before_the_replica_failed_does_not_announce_it_back(
    database: Database, standby: PostgresCluster, secretsmanager: Any, secret: str, make_app: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    app = make_app(_settings(database, standby, secret), secrets_client=secretsmanager)
    state = _state(app)
    with app.app_context():
        # Another greenlet's replica read fails while this one is checking out its connection
        # (seen under gunicorn: the standby stopping, or its sessions ended by a rotation).
        def failed_meanwhile(*_: Any) -> None:
            state.mark_down(ConnectionRefusedError())

        sa.event.listen(db.engines["replica"], "checkout", failed_meanwhile, once=True)
        conn = state.connect()
    assert conn is not None  # its own connection works: it may serve this read
    conn.close()
    # ... but the failure reported meanwhile stands: reads go to the primary until it expires.
    assert state.reason == "connection refused"
    assert state.status()["reading"] is False
    assert "replica_reads_resumed" not in caplog.text


def test_a_replayed_key_whose_row_the_replica_lacks_is_read_from_the_primary(
    database: Database, standby: PostgresCluster, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    # The replica counts as fresh for a minute: only the key's own path keeps it off the standby.
    app = make_app(
        _settings(database, standby, secret, db_replica_max_lag_ms=60_000), secrets_client=secretsmanager
    )
    client = app.test_client()
    channel = _post(app, "/api/channels", {"name": "keyed"})
    wait_for(lambda: len(_get(app, "/api/channels")["channels"]) == 1)
    state = _state(app)
    standby.execute("SELECT pg_wal_replay_pause()")
    try:
        path, headers = f"/api/channels/{channel}/messages", {"Idempotency-Key": "replay-me"}
        first = client.post(path, json={"body": "keyed while paused"}, headers=headers)
        assert first.status_code == 201, first.json
        on_standby = "SELECT count(*) FROM messages WHERE id = %s"
        assert standby.execute(on_standby, (first.json["id"],), dbname=database.name) == [(0,)]
        replica_reads = state.reads["replica"]
        assert _get(app, f"/api/channels/{channel}/messages")["messages"] == []  # the standby's view
        assert state.reads["replica"] == replica_reads + 1

        again = client.post(path, json={"body": "keyed while paused"}, headers=headers)
        assert again.status_code == 201, again.json
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json == first.json
    finally:
        standby.execute("SELECT pg_wal_replay_resume()")
