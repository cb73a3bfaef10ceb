"""The replica's harder faults (review findings 2 and 3), on a real hot standby.

- A standby whose WAL receiver stopped has replayed everything it received, so "received =
  replayed" read as no lag while it fell arbitrarily behind: reads must go to the primary.
- A replica whose pool stays full raises SQLAlchemy's pool ``TimeoutError`` (not a DBAPI
  error): the read must fall back to the primary instead of failing.
- Once a failure's retry period is over, one read probes the replica; against a frozen
  standby the others go on to the primary instead of each paying the connect bound.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask

from commng.db import ReplicaState, db, replica_state
from devstack import PostgresCluster
from tests.helpers import Database, frozen, postmaster_pid, wait_for


def _app(database: Database, standby: PostgresCluster, make_app: Any, **overrides: Any) -> Flask:
    wait_for(lambda: standby.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database.name,)))
    settings = database.settings(
        postgres_replica_host="127.0.0.1", postgres_replica_port=standby.port, **overrides
    )
    app: Flask = make_app(settings)
    return app


def _state(app: Flask) -> ReplicaState:
    state = replica_state(app)
    assert state is not None
    return state


def _channels(app: Flask) -> list[Any]:
    response = app.test_client().get("/api/channels")
    assert response.status_code == 200, response.json
    channels: list[Any] = response.json["channels"]
    return channels


def test_a_standby_whose_wal_receiver_stopped_is_not_read(
    database: Database, standby: PostgresCluster, make_app: Any
) -> None:
    app = _app(database, standby, make_app)
    state = _state(app)
    _channels(app)
    assert state.reads["replica"] == 1
    conninfo = standby.execute("SHOW primary_conninfo")[0][0]
    standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
    standby.execute("SELECT pg_reload_conf()")
    try:
        wait_for(lambda: not standby.execute("SELECT 1 FROM pg_stat_wal_receiver"))
        created = app.test_client().post("/api/channels", json={"name": "after-the-stream-stopped"})
        assert created.status_code == 201

        def read_from_the_primary() -> bool:
            state.lag_checked_at = float("-inf")  # measure now, not within the next second
            return [c["name"] for c in _channels(app)] == ["after-the-stream-stopped"]

        wait_for(read_from_the_primary)
        assert state.reason == "replication not streaming"
        assert state.status()["streaming"] is False
    finally:
        standby.execute("ALTER SYSTEM SET primary_conninfo = %s", (conninfo,))
        standby.execute("SELECT pg_reload_conf()")
    wait_for(lambda: standby.execute("SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'"))

    def back() -> bool:
        state.lag_checked_at = float("-inf")
        before = state.reads["replica"]
        _channels(app)
        return state.reads["replica"] > before

    wait_for(back, timeout_s=20)
    assert state.streaming


def test_a_replica_whose_pool_stays_full_sends_reads_to_the_primary(
    database: Database, standby: PostgresCluster, make_app: Any
) -> None:
    app = _app(
        database, standby, make_app, postgres_pool_size=1, postgres_max_overflow=0, postgres_pool_timeout_s=1
    )
    state = _state(app)
    with app.app_context():
        held = db.engines["replica"].connect()  # the replica pool's only connection
    try:
        assert _channels(app) == []
    finally:
        held.close()
    assert state.reads == {"primary": 1}
    assert state.reason is not None
    assert "TimeoutError" in state.reason or "timeout" in state.reason.lower()


def test_after_a_failure_one_read_probes_a_frozen_replica_while_the_others_go_to_the_primary(
    database: Database, standby: PostgresCluster, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _app(database, standby, make_app)
    state = _state(app)
    _channels(app)
    attempts: list[int] = []
    with app.app_context():
        replica = db.engines["replica"]
    replica.dispose()  # no pooled connection: every replica read must connect
    connect = replica.dialect.connect

    def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        return connect(*args, **kwargs)

    monkeypatch.setattr(replica.dialect, "connect", counted)
    state.mark_down(ConnectionRefusedError())
    state.down_until = 0.0  # the retry period is over: the next read probes
    probe = threading.Thread(target=_channels, args=(app,))
    with frozen([postmaster_pid(standby)]):
        probe.start()
        wait_for(lambda: attempts)  # the probe is connecting, and nothing answers
        primary = state.reads["primary"]
        for _ in range(5):
            assert _channels(app) == []
        assert state.reads["primary"] == primary + 5
        assert len(attempts) == 1  # nobody but the probe tried the frozen replica
        probe.join(timeout=30)
    assert not probe.is_alive()
    assert state.reads["primary"] == primary + 6  # the probe's read too, once it gave up
