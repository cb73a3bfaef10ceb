"""Serving requests from the database: the ``db`` object, its session, and reads.

``db`` is Flask-SQLAlchemy with the rotation layer's ``PinnedSession`` (a transaction
stays on the engine it began on, whatever a swap does meanwhile). What makes a request
survive a connection that died under it is the rotation layer's, used here as any
adopter uses it:

- ``retry_on_disconnect`` (every API view): the view runs again after a disconnect when
  nothing was committed; a COMMIT cut by the disconnect is judged by PostgreSQL
  (``pg_xact_status``) before anything runs again.
- ``commng_rotation.reading``: a read-only block runs without a transaction (no BEGIN, no
  ROLLBACK). ``reading()`` below adds the read replica to it.
- the teardown that survives a backend gone after the view returned.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session

import commng_rotation as rotation
from commng_rotation import (
    MAX_ATTEMPTS,
    REPLICA_BIND,
    NoCredentials,
    PinnedSession,
    bounds,
    caller_retries,
    describe_error,
    get_runtime,
    retry_on_disconnect,
)

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

log = structlog.get_logger("commng.db")


class Base(DeclarativeBase):
    pass


# expire_on_commit=False: a view that commits can still render what it wrote without a
# second transaction (and without a second chance to meet a dead connection).
db = SQLAlchemy(model_class=Base, session_options={"class_": PinnedSession, "expire_on_commit": False})


def init_app(app: Flask) -> None:
    """With a replica bind, ``reading()`` serves read-only routes from it (``ReplicaState``)."""
    if REPLICA_BIND in get_runtime(app).rotators:
        app.extensions[REPLICA_EXTENSION] = ReplicaState(app.config["COMMNG_SETTINGS"].db_replica_max_lag_ms)


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


@contextmanager
def reading() -> Iterator[Any]:
    """A session for reads, without a transaction: the replica's when it is configured,
    reachable and caught up.

    Otherwise the primary's ``db.session``. A replica connection that dies in the block is
    invalidated and the replica skipped for REPLICA_RETRY_S; the error goes on to
    ``retry_on_disconnect``, whose next attempt reads from the primary.
    """
    state = replica_state()
    conn = state.connect() if state is not None else None
    if conn is None:
        with rotation.reading(db.session) as primary, _counted(state, "primary"):
            yield primary
        return
    session = Session(bind=conn)
    try:
        with rotation.reading(session), _counted(state, REPLICA_BIND):
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
