"""Reads without a transaction, and what must hold around them (review findings 6 and 8).

- A write later in the same view than a ``reading()`` block runs in a transaction, with its
  COMMIT noted for the in-doubt protection (finding 8: the session used to stay in
  autocommit for the rest of the request, so the write committed per statement).
- A write inside the block is refused: it would commit on its own.
- A read connection returned to an engine that was retired meanwhile (a swap's grace period
  ended while the read was checked out) is closed quietly (finding 6: the retirement closed
  it, then the autocommit reset touched the closed connection and raised out of checkin).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from commng.db import db, reading, retry_on_disconnect
from commng.models import Channel
from commng_rotation import get_runtime
from tests.helpers import Database


def _noted_xids() -> list[str | None]:
    from commng_rotation.xid import ATTEMPT_XIDS

    return list(ATTEMPT_XIDS.get() or [])


def test_a_write_after_a_read_block_runs_in_a_transaction(app: Flask, database: Database) -> None:
    @retry_on_disconnect
    def view() -> tuple[bool, list[str | None]]:
        with reading() as session:
            session.execute(sa.select(sa.func.count()).select_from(Channel)).scalar()
        db.session.add(Channel(name="after-read"))
        db.session.flush()
        raw = db.session.connection().connection.dbapi_connection
        in_transaction = not raw.autocommit
        db.session.commit()
        return in_transaction, _noted_xids()

    with app.test_request_context():
        in_transaction, xids = view()
    assert in_transaction
    # The COMMIT went out for a transaction that wrote, and its id was noted first.
    assert len(xids) == 1
    assert xids[0] is not None


def test_a_write_inside_a_read_block_is_refused(app: Flask, database: Database) -> None:
    with app.test_request_context(), pytest.raises(sa.exc.DBAPIError) as raised, reading() as session:
        session.execute(sa.text("INSERT INTO channels (name, created_at) VALUES ('inside', now())"))
    assert "reading()" in str(raised.value.orig)
    with app.app_context():
        db.session.rollback()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Channel)) == 0


def test_a_read_returned_to_a_retired_engine_is_closed_without_an_error(
    app: Flask, database: Database
) -> None:
    from commng_rotation.engines import drain

    runtime = get_runtime(app)
    with app.test_request_context():
        managed = runtime.rotator().active
        assert managed is not None
        with reading() as session:
            session.execute(sa.select(sa.literal(1))).scalar()
            raw: Any = db.session.connection().connection.dbapi_connection
            # What a swap does when the grace period ends with this read still checked out.
            drain(managed, 0, threading.Event())
        # The request's teardown returns the connection: no exception, and it is closed.
        db.session.remove()
    assert raw.closed


def test_a_read_whose_pooled_connection_was_closed_under_it_runs_again(
    app: Flask, database: Database
) -> None:
    """Switching autocommit on is no statement: SQLAlchemy does not see a closed connection
    there. It must still be the disconnect it is, run again on a fresh connection, not a 500
    (seen under load when idle backends were killed during a rotation)."""
    calls: list[int] = []

    @retry_on_disconnect
    def view() -> int:
        calls.append(1)
        if len(calls) == 1:
            db.session.connection().connection.dbapi_connection.close()  # closed while pooled
        with reading() as session:
            return int(session.execute(sa.select(sa.func.count()).select_from(Channel)).scalar() or 0)

    with app.test_request_context():
        assert view() == 0
    assert len(calls) == 2
