"""Which transactions a retried view sent COMMIT for: noted by psycopg2 classes, not by events.

``retry_on_disconnect`` (``commng_rotation.retry``) must know, after a connection died, whether a
COMMIT it sent may have committed. Each of its attempts sets ``ATTEMPT_XIDS`` to a fresh
list; every COMMIT sent while it is set first appends a ``NotedCommit`` (None: the
transaction wrote nothing): the transaction's id, and the anchor of the server it ran on.
Outside a retried view it is None and nothing is noted.

**The anchor** is the server's system identifier and WAL timeline (``ANCHOR_SQL``), read
once per connection when it opens (``note_anchor``, a pool ``connect`` listener). A
transaction id names one transaction only within one server history: after a failover
the promoted standby goes on handing out ids from its replay point, so an id the old
primary assigned (whose WAL never reached the standby) can name another transaction
there, on a new timeline; a Blue/Green target is another system altogether. A verdict is
trusted only from a server with the same anchor. A restart keeps both, a promotion
changes the timeline.

**The witness** is the write's own effect, which a failover cannot reuse: a query that
returns a row on the writer if and only if the transaction committed (the created row,
by its id and content; an idempotency key's row). A view names it with ``witness()``
before it commits. When another server answers (the anchor differs), its verdict comes
from the witness instead of the id: the row is there, so the COMMIT took effect on the
history this writer continues; it is not, so nothing of it survives there, and running
the view again writes it once.

The id costs no round trip of its own: ``XidCursor.execute`` sends the transaction's
first INSERT, UPDATE or DELETE behind a ``DO`` block that raises a NOTICE with
``pg_current_xact_id()``, in the same message, and takes that NOTICE back out of the
connection's notices (SQLAlchemy would log it otherwise). ``XidConnection.commit``
appends it before the real COMMIT goes out; a transaction that wrote some other way
(``executemany``, a statement given as bytes, a CTE) or whose NOTICE did not arrive asks
``pg_current_xact_id_if_assigned()`` on its own cursor first. ``commit`` and ``rollback``
forget the transaction's id.

This sits at the DBAPI level on purpose: a SQLAlchemy ``ConnectionEvents`` listener on an
engine makes every ``Connection`` of it build a joined dispatcher and every execute go
through the event hooks (about 100 Python calls per request); these classes cost one
method call per execute and per COMMIT. ``init_app`` makes every engine's connections
with ``XidConnection`` (``CONNECT_ARGS``); a host that hands in a ``connection_factory`` of
its own must subclass it.

While ``reading()`` (``commng_rotation.reads``) runs its block without a transaction,
``XidCursor`` refuses INSERT, UPDATE and DELETE: in autocommit each would commit on its
own, outside what the retry can judge, and a retry after a disconnect could write twice.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, NamedTuple

import psycopg2
import psycopg2.extensions

__all__ = [
    "ANCHOR_SQL",
    "ATTEMPT_XIDS",
    "CONNECT_ARGS",
    "READING",
    "NotedCommit",
    "Witness",
    "WriteInReadBlock",
    "XidConnection",
    "XidCursor",
    "note_anchor",
    "witness",
]


class Witness(NamedTuple):
    """A query (DBAPI paramstyle) that returns a row on the writer iff the transaction committed."""

    sql: str
    params: dict[str, Any]


class NotedCommit(NamedTuple):
    """A COMMIT about to go out: its transaction's id, the server's anchor (None: unknown), and
    the transaction's witness (None: none was named)."""

    xid: str
    anchor: str | None
    witness: Witness | None = None


# The commits noted in this attempt of a retried view; None outside one.
ATTEMPT_XIDS: ContextVar[list[NotedCommit | None] | None] = ContextVar(
    "commng_rotation_attempt_xids", default=None
)
# "<system identifier>:<timeline>" of the server (a primary: pg_walfile_name refuses to run
# during recovery, and a standby takes no writes anyway). Both functions are executable by
# every role in PostgreSQL 15; where a platform refuses them, the anchor is None and a
# verdict is trusted as it was before anchors (see docs/faults.md).
ANCHOR_SQL = (
    "SELECT (SELECT system_identifier::text FROM pg_control_system()) || ':' || "
    "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
)
# True inside a ``reading()`` block, whose statements run in autocommit: writes are refused.
READING: ContextVar[bool] = ContextVar("commng_rotation_reading", default=False)


class WriteInReadBlock(psycopg2.ProgrammingError):
    """An INSERT, UPDATE or DELETE sent inside ``reading()``, where it would commit on its own."""


# Sent in front of a transaction's first write, in the same message: the id in a NOTICE.
# No '%' in it: psycopg2 interpolates parameters into the statement text.
_XID_NOTICE = "commng_xid="
_XID_PREFIX = (
    f"DO $commng$BEGIN RAISE NOTICE USING MESSAGE = '{_XID_NOTICE}' || pg_current_xact_id(); END$commng$; "
)
_WRITES = ("insert", "update", "delete")
_ASSIGNED_XID = "SELECT pg_current_xact_id_if_assigned()::text"


class XidCursor(psycopg2.extensions.cursor):
    """Sends a retried view's first write of a transaction with the transaction's id request."""

    def execute(self, query: Any, vars: Any = None) -> None:
        conn: XidConnection = self.connection  # type: ignore[assignment]  # made by XidConnection
        if not (isinstance(query, str) and query[:6].lower() in _WRITES):
            super().execute(query, vars)
            return
        if READING.get():
            raise WriteInReadBlock("a write inside reading(): run it outside the block, in a transaction")
        if not conn.commng_xid_asked and ATTEMPT_XIDS.get() is not None:
            conn.commng_xid_asked = True  # once per transaction, even if the NOTICE never comes
            super().execute(_XID_PREFIX + query, vars)
            conn.take_xid_notice()
            return
        super().execute(query, vars)


class XidConnection(psycopg2.extensions.connection):
    """Notes the id of each transaction it commits while a retried view runs (module docstring)."""

    # Per transaction: the id the NOTICE reported, and whether the DO block went out.
    commng_xid: str | None = None
    commng_xid_asked = False
    # Per connection: the server's anchor (note_anchor), None until read or where refused.
    commng_anchor: str | None = None
    # Per transaction: what witness() named.
    commng_witness: Witness | None = None

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.cursor_factory = XidCursor

    def take_xid_notice(self) -> None:
        """Keep the id the DO block reported, and remove its NOTICE from ``notices``."""
        notices: list[str] = self.notices
        for i in range(len(notices) - 1, -1, -1):
            _, found, reported = notices[i].partition(_XID_NOTICE)
            if found:
                del notices[i]
                self.commng_xid = reported.strip()
                return

    def commit(self) -> None:
        xid, self.commng_xid, self.commng_xid_asked = self.commng_xid, None, False
        named, self.commng_witness = self.commng_witness, None
        xids = ATTEMPT_XIDS.get()
        if xids is not None and self.status == psycopg2.extensions.STATUS_BEGIN:
            # Runs before COMMIT goes out; if this fails, the COMMIT was never sent.
            if xid is None:
                with self.cursor() as cursor:
                    cursor.execute(_ASSIGNED_XID)
                    row = cursor.fetchone()
                xid = row[0] if row else None
            xids.append(None if xid is None else NotedCommit(xid, self.commng_anchor, named))
        super().commit()

    def rollback(self) -> None:
        self.commng_xid, self.commng_xid_asked, self.commng_witness = None, False, None
        super().rollback()


def witness(session: Any, sql: str, params: dict[str, Any]) -> None:
    """Name the witness of ``session``'s transaction on its default bind (module docstring).

    ``sql`` is a statement in psycopg2's paramstyle (``%(name)s``) that returns a row on the
    writer if and only if this transaction committed, e.g. ``SELECT 1 FROM messages WHERE
    id = %(id)s AND body = %(body)s`` once the INSERT is flushed. It is run only when the
    COMMIT was cut and a server with another anchor answers (a failover in between). No
    round trip: it is kept on the connection until the transaction ends.
    """
    dbapi_connection = session.connection().connection.dbapi_connection
    if isinstance(dbapi_connection, XidConnection):
        dbapi_connection.commng_witness = Witness(sql, dict(params))


def note_anchor(dbapi_connection: Any, record: Any) -> None:
    """Pool ``connect`` listener: keep the new connection's server anchor (one round trip)."""
    if not isinstance(dbapi_connection, XidConnection):
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(ANCHOR_SQL)
            row = cursor.fetchone()
        dbapi_connection.commng_anchor = row[0] if row else None
    except psycopg2.Error:  # a standby, or a platform that refuses the functions
        dbapi_connection.commng_anchor = None
    finally:
        if not dbapi_connection.closed:
            dbapi_connection.rollback()


# What psycopg2.connect needs for the classes above (every engine ``init_app`` builds).
CONNECT_ARGS: dict[str, Any] = {"connection_factory": XidConnection}
