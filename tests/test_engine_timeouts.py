"""A wait that gives up closes its own connection only; the rest of the pool is not suspect.

When the bounded wait (``commng_rotation.bounds``) runs out, psycopg2 closes that
connection and SQLAlchemy takes it for a disconnect, which by default invalidates the
whole pool: under overload every idle connection would then reconnect, with a full
SCRAM handshake each, exactly when the server is slow. A restart or a failover still
invalidates the whole pool.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from commng_rotation import bounds, get_runtime
from tests.helpers import Database, frozen


def _engine(app: Flask) -> sa.Engine:
    active = get_runtime(app).rotator().active
    assert active is not None
    return active.engine


def _pid(conn: sa.Connection) -> int:
    pid: int = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return pid


def _idle(engine: sa.Engine, n: int) -> list[int]:
    """Open ``n`` connections and return them to the pool; their backend pids, oldest first."""
    conns = [engine.connect() for _ in range(n)]
    pids = [_pid(c) for c in conns]
    for conn in conns:
        conn.close()
    return pids


def _checked_out_pids(engine: sa.Engine, n: int) -> set[int]:
    conns = [engine.connect() for _ in range(n)]
    try:
        return {_pid(c) for c in conns}
    finally:
        for conn in conns:
            conn.close()


def test_a_statement_that_outlives_its_deadline_invalidates_its_connection_only(
    secret_app: Flask,
) -> None:
    engine = _engine(secret_app)
    first, *others = _idle(engine, 3)

    with bounds.deadline(0.3), engine.connect() as conn:
        assert _pid(conn) == first  # the pool hands out its oldest idle connection
        with pytest.raises(sa.exc.OperationalError) as raised:
            conn.exec_driver_sql("SELECT pg_sleep(5)")

    assert raised.value.connection_invalidated
    assert _checked_out_pids(engine, 2) == set(others), "the other idle connections were replaced"


def test_a_checkout_ping_that_times_out_replaces_that_connection_only(
    database: Database, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    """The backend of one idle connection is frozen: the ping before its checkout gives up."""
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, postgres_statement_timeout_ms=1000
    )
    app = make_app(settings, secrets_client=secretsmanager)
    engine = _engine(app)
    first, *others = _idle(engine, 3)

    with frozen([first]), engine.connect() as conn:  # the ping waits at most 1 s + 1 s
        replaced = _pid(conn)
    assert replaced not in {first, *others}

    assert _checked_out_pids(engine, 2) == set(others), "the other idle connections were replaced"
