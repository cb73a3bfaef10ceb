"""Serving requests from the database: the ``db`` object, its session, and the retry.

``db`` is Flask-SQLAlchemy with the rotation layer's ``PinnedSession`` (a transaction
stays on the engine it began on, whatever a swap does meanwhile). Two things make a
request survive a connection that died under it:

- **The retry.** A backend can disappear between the pool's pre-ping and the request's
  statements (pg_terminate_backend, a failover, a NAT timeout). Until a COMMIT has been
  sent, nothing the request did is durable, so running the view again on a fresh
  connection is exactly equivalent (an INSERT flushed inside ``session.commit()`` still
  counts as not committed). When the connection dies after COMMIT was sent, the outcome
  is in doubt. Before sending it we note the transaction's id, and after the failure we
  ask PostgreSQL on a fresh connection (``pg_xact_status``): ``aborted`` (the backend
  was gone before it read the COMMIT) or no id at all (nothing was written) means the
  view runs again; ``committed``, or no clear answer, returns the error as it is.
  Attempts are bounded. The ids are noted by the psycopg2 connection and cursor classes
  of ``commng/xid.py``, which every engine's connections are made with (no SQLAlchemy
  connection event, which would cost every request): the transaction's first INSERT,
  UPDATE or DELETE goes out behind a ``DO`` block that raises a NOTICE with
  ``pg_current_xact_id()``, in the same message, so the id costs no round trip of its
  own; a transaction that wrote some other way (or whose notice did not arrive) asks
  ``pg_current_xact_id_if_assigned()`` just before COMMIT.
  Since the view runs again anyway after a disconnect, its connections are checked out
  without the pool's ping (``caller_retries``): one round trip fewer per request.
- **The teardown.** A read leaves its transaction open until teardown, where closing the
  session sends ROLLBACK. If the backend went away after the view returned, that
  ROLLBACK raises, and an exception out of teardown becomes a 500 for a request whose
  response was already complete. Nothing is lost by carrying on: the server ended the
  transaction with the connection, and SQLAlchemy has invalidated the connection, which
  returns its pool slot.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session

from commng.xid import ATTEMPT_XIDS, XidConnection
from commng_rotation import NoCredentials, PinnedSession, bounds, describe_error, get_runtime
from commng_rotation.engines import ManagedEngine, caller_retries
from commng_rotation.runtime import REPLICA_BIND

__all__ = [
    "MAX_ATTEMPTS",
    "Base",
    "ReplicaState",
    "db",
    "init_app",
    "read_listeners",
    "reading",
    "replica_state",
    "retry_on_disconnect",
]

MAX_ATTEMPTS = 3
# A terminated backend aborts its transaction as it exits: an 'in progress' verdict is asked
# again for this long.
XACT_STATUS_WAIT_S = 2.0
F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("commng.db")


class Base(DeclarativeBase):
    pass


# expire_on_commit=False: a view that commits can still render what it wrote without a
# second transaction (and without a second chance to meet a dead connection).
db = SQLAlchemy(model_class=Base, session_options={"class_": PinnedSession, "expire_on_commit": False})


def init_app(app: Flask) -> None:
    """Check every engine notes its COMMITs (``commng.xid``); reads' connections go back with
    transactions on; teardown survives a dead backend.

    With a replica bind, ``reading()`` serves read-only routes from it (``ReplicaState``).
    """
    if REPLICA_BIND in get_runtime(app).rotators:
        app.extensions[REPLICA_EXTENSION] = ReplicaState(app.config["COMMNG_SETTINGS"].db_replica_max_lag_ms)
    for bind, rotator in get_runtime(app).rotators.items():
        # Every engine, the first included, must be built with them: a connection without
        # them notes no COMMIT, and the retry could run a committed request again.
        if rotator.factory.connect_args.get("connection_factory") is not XidConnection:
            raise RuntimeError(f"bind {bind!r}: rotation.init_app needs connect_args=commng.xid.CONNECT_ARGS")
        rotator.factory.build_listeners.append(_listen_for_checkins)
        if rotator.active is not None:
            _listen_for_checkins(rotator.active)
    # Registered after Flask-SQLAlchemy's own teardown, so it runs before it (Flask runs
    # teardowns in reverse): the session is already removed when Flask-SQLAlchemy looks.
    app.teardown_appcontext(_remove_session)


def _remove_session(_: BaseException | None) -> None:
    try:
        db.session.remove()
    except DBAPIError as err:
        log.warning("session_close_failed", error=describe_error(err))
        db.session.registry.clear()


def _xact_status(xid: str) -> str | None:
    """'committed', 'aborted' or 'in progress' for ``xid``; None if PostgreSQL cannot say now.

    Asked within the request's own bounds (``retry_on_disconnect``'s outage wait and
    deadline), on a checkout that is pinged: a COMMIT cut by a restart gets its verdict
    once the server accepts connections again, as the request's other work would. Only
    an 'in progress' answer is asked again, for up to XACT_STATUS_WAIT_S.
    """
    verdict_by: float | None = None
    while True:
        try:
            with caller_retries(False), db.engine.connect() as conn:
                status = conn.exec_driver_sql("SELECT pg_xact_status(%(xid)s::xid8)", {"xid": xid}).scalar()
        except DBAPIError:
            return None
        now = time.monotonic()
        if verdict_by is None:
            verdict_by = now + XACT_STATUS_WAIT_S
        if status != "in progress" or now >= verdict_by:
            return str(status) if status is not None else None
        time.sleep(0.02)  # bounded; yields to other greenlets under gevent


def _nothing_committed(xids: list[str | None]) -> bool:
    """True when every COMMIT this attempt sent (``xids``) wrote nothing or, PostgreSQL says, aborted."""
    for xid in xids:
        if xid is None:  # a transaction that never wrote: there was nothing to commit
            continue
        status = _xact_status(xid)
        log.info("commit_outcome_resolved", status=status or "unknown")
        if status != "aborted":
            return False
    return True


def retry_on_disconnect(view: F) -> F:
    """Run ``view`` again (at most MAX_ATTEMPTS in all) after a disconnect before any commit.

    The whole request's database work is bounded: connection attempts wait out an outage
    for up to the outage budget, and no wait lasts past that budget plus one statement
    timeout.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = get_runtime().settings
        budget_s = settings.outage_wait_s
        with (
            bounds.outage_wait(budget_s),
            bounds.deadline(budget_s + settings.statement_timeout_ms / 1000),
            caller_retries(),
        ):
            for attempt in range(1, MAX_ATTEMPTS + 1):
                xids: list[str | None] = []
                token = ATTEMPT_XIDS.set(xids)
                try:
                    return view(*args, **kwargs)
                except DBAPIError as exc:
                    if not exc.connection_invalidated or attempt == MAX_ATTEMPTS:
                        raise
                    db.session.rollback()
                    if not _nothing_committed(xids):
                        raise
                    log.warning("request_retried_after_disconnect", attempt=attempt)
                finally:
                    ATTEMPT_XIDS.reset(token)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper  # type: ignore[return-value]


# -- reads from the replica ----------------------------------------------------------------

REPLICA_EXTENSION = "commng_replica"
# A replica that failed is not asked again for this long: one request per interval pays
# for finding out whether it is back, the others go straight to the primary.
REPLICA_RETRY_S = 2.0
# Its replay lag is measured at most this often (one query, by whichever read comes first).
LAG_CHECK_INTERVAL_S = 1.0
# A connection to the replica never waits longer than this: the primary is right there.
REPLICA_CONNECT_S = 2.0
# Milliseconds the replica's replay is behind: 0 when it has replayed all it received (an
# idle primary sends nothing, and the last replayed transaction may be old), NULL when the
# server is not a standby at all.
LAG_SQL = (
    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0 "
    "WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000, 0) END"
)
# Told the bind ("replica" or "primary") of every read reading() serves (metrics).
read_listeners: list[Callable[[str], None]] = []


@dataclass
class ReplicaState:
    """Whether this worker reads from its replica now, and why not when it does not."""

    max_lag_ms: int
    down_until: float = 0.0
    reason: str | None = None
    lag_ms: float | None = None
    lag_checked_at: float = float("-inf")
    reads: Counter[str] = field(default_factory=Counter)
    _checking: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lagging(self) -> bool:
        return self.lag_ms is not None and self.lag_ms > self.max_lag_ms

    def connect(self) -> Connection | None:
        """A connection to the replica, or None when reads should go to the primary now."""
        now = time.monotonic()
        if now < self.down_until:
            return None
        due = now - self.lag_checked_at >= LAG_CHECK_INTERVAL_S
        if self.lagging and not due:
            return None
        try:
            # No outage wait: a replica that refuses connections is skipped, not waited for.
            # Pinged at checkout even inside a retried view: a pooled replica connection
            # that died (a restart, sessions ended after a rotation) is replaced here,
            # instead of failing its first read and sending reads to the primary for
            # REPLICA_RETRY_S while the replica is fine.
            with bounds.outage_wait(0), bounds.deadline(REPLICA_CONNECT_S), caller_retries(False):
                conn = db.engines[REPLICA_BIND].connect()
        except (DBAPIError, NoCredentials) as exc:
            self.mark_down(exc)
            return None
        if due and self._checking.acquire(blocking=False):
            try:
                with bounds.deadline(REPLICA_CONNECT_S):
                    lag = conn.exec_driver_sql(LAG_SQL).scalar()
                conn.rollback()
            except DBAPIError as exc:
                conn.close()
                self.mark_down(exc)
                return None
            finally:
                self._checking.release()
            self._lag_measured(float(lag or 0))
        if self.lagging:
            conn.close()
            return None
        # A failure another read reported while this one connected stands until it expires.
        if self.reason is not None and time.monotonic() >= self.down_until:
            log.info("replica_reads_resumed", after=self.reason)
            self.reason = None
        return conn

    def mark_down(self, exc: BaseException) -> None:
        """Send reads to the primary for REPLICA_RETRY_S."""
        reason = describe_error(exc)
        if self.reason != reason:
            log.warning("replica_unavailable", reason=reason, retry_in_s=REPLICA_RETRY_S)
        self.reason = reason
        self.down_until = time.monotonic() + REPLICA_RETRY_S

    def _lag_measured(self, lag_ms: float) -> None:
        was = self.lagging
        self.lag_ms = lag_ms
        self.lag_checked_at = time.monotonic()
        if self.lagging and not was:
            log.warning("replica_lagging", lag_ms=round(lag_ms), max_lag_ms=self.max_lag_ms)
            self.reason = "replication lag"

    def status(self) -> dict[str, Any]:
        return {
            "reading": time.monotonic() >= self.down_until and not self.lagging,
            "reason": self.reason,
            "lag_ms": None if self.lag_ms is None else round(self.lag_ms),
            "max_lag_ms": self.max_lag_ms,
            "reads": dict(self.reads),
        }


def replica_state(app: Flask | None = None) -> ReplicaState | None:
    """This worker's replica state, or None when no replica is configured."""
    target = app if app is not None else current_app
    state: ReplicaState | None = target.extensions.get(REPLICA_EXTENSION)
    return state


def _served(state: ReplicaState | None, bind: str) -> None:
    if state is not None:
        state.reads[bind] += 1
    for listener in read_listeners:
        listener(bind)


# Reads run without a transaction. Under READ COMMITTED (PostgreSQL's default, and the
# service's) each statement takes its own snapshot inside a transaction too, so the BEGIN
# psycopg2 sends before a read route's first statement and the ROLLBACK that ends it buy
# nothing but two round trips. psycopg2's ``autocommit`` is a client-side switch (no
# statement goes out), set on the read's connection and turned off again for every
# connection the pool gets back (``_autocommit_off``), so no write ever runs without its
# transaction. SQLAlchemy's ``isolation_level="AUTOCOMMIT"`` option would do the same but
# sends ``SET default_transaction_isolation`` when it resets the connection.
def _without_transaction(connection: Connection) -> None:
    connection.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]


def _autocommit_off(dbapi_connection: Any, record: Any) -> None:
    """Pool ``checkin``: whatever a read did, the connection goes back with transactions on."""
    if dbapi_connection is not None and dbapi_connection.autocommit:
        dbapi_connection.autocommit = False


def _listen_for_checkins(managed: ManagedEngine) -> None:
    sa.event.listen(managed.engine, "checkin", _autocommit_off)


@contextmanager
def reading() -> Iterator[Any]:
    """A session for reads: the replica's when it is configured, reachable and caught up.

    Otherwise the primary's ``db.session``. A replica connection that dies in the block is
    invalidated and the replica skipped for REPLICA_RETRY_S; the error goes on to
    ``retry_on_disconnect``, whose next attempt reads from the primary.
    """
    state = replica_state()
    conn = state.connect() if state is not None else None
    if conn is None:
        primary = db.session()
        if not primary.in_transaction():
            _without_transaction(primary.connection())
        with _counted(state, "primary"):
            yield db.session
        return
    _without_transaction(conn)
    session = Session(bind=conn)
    try:
        with _counted(state, REPLICA_BIND):
            yield session
    except DBAPIError as exc:
        if exc.connection_invalidated and state is not None:
            state.mark_down(exc)
        raise
    finally:
        session.close()
        conn.close()


@contextmanager
def _counted(state: ReplicaState | None, bind: str) -> Iterator[None]:
    """Count a read by ``bind`` once the block is done, unless the database failed it.

    A read that fails on a replica connection found dead at its first statement (pooled
    connections are not pinged on the retried path) runs again on the primary: that
    one, not the failed attempt, served it. A 404 or 400 raised inside still counts.
    """
    try:
        yield
    except DBAPIError:
        raise
    except BaseException:
        _served(state, bind)
        raise
    _served(state, bind)


def from_replica(session: Any) -> bool:
    """True when ``session`` came from ``reading()`` on the replica (not the primary's)."""
    return session is not db.session
