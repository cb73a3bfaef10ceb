"""Reads without a transaction: no BEGIN and no ROLLBACK around a read-only block.

Under READ COMMITTED (PostgreSQL's default) each statement takes its own snapshot inside a
transaction too, so the BEGIN psycopg2 sends before a read's first statement and the
ROLLBACK that ends it buy nothing but two round trips. ``reading()`` switches psycopg2's
``autocommit`` on for its block (a client-side switch: no statement goes out) and off again
when the block ends, so a write later in the same view runs in its transaction, with the
in-doubt COMMIT protection of ``retry_on_disconnect``. Inside the block a write is refused
(``WriteInReadBlock``). Every engine's pool ``checkin`` listener (``commng_rotation.engines``)
turns autocommit off again as well, whatever happened to the block, before any other
check-in work: no connection goes back to a pool in autocommit.

SQLAlchemy's ``isolation_level="AUTOCOMMIT"`` option would do the same but sends
``SET default_transaction_isolation`` when it resets the connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import sqlalchemy as sa
from sqlalchemy.orm import scoped_session

from commng_rotation.runtime import get_runtime
from commng_rotation.xid import READING

__all__ = ["reading"]


@contextmanager
def reading(session: Any = None) -> Iterator[Any]:
    """Yield ``session`` (default: the app's ``db.session``) for reads without a transaction.

    ``session`` may be a Flask-SQLAlchemy scoped session or a plain ``Session`` (one bound
    to a replica's connection, say). A session already in a transaction keeps it: the
    block's reads join it. INSERT, UPDATE and DELETE inside the block raise
    ``WriteInReadBlock``.
    """
    if session is None:
        session = get_runtime().db.session
    current = session() if isinstance(session, scoped_session) else session
    raw = None
    if not current.in_transaction():
        connection = current.connection()
        raw = connection.connection.dbapi_connection
        try:
            raw.autocommit = True
        except psycopg2.InterfaceError as exc:
            # Closed under us (a pooled connection whose backend went away): the switch is
            # not a statement, so SQLAlchemy did not see it. Make it the disconnect it is,
            # for retry_on_disconnect to run the view again on a fresh connection.
            connection.invalidate(exc)
            raise sa.exc.InterfaceError(None, None, exc, connection_invalidated=True) from exc
    token = READING.set(True)
    try:
        yield session
    finally:
        READING.reset(token)
        if raw is not None and not raw.closed:
            raw.autocommit = False
