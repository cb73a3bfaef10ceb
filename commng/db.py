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

import sqlalchemy as sa
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
# idle primary sends nothing, and the last replayed transaction may be old) or when the
# server is not a standby at all; NULL when its WAL receiver is not streaming, since then
# "replayed all it received" says nothing (what it received stopped growing). Every role
# sees whether a WAL receiver runs; its status and last message time are visible to roles
# with pg_read_all_stats (pg_monitor), and checked where visible: a streaming standby hears
# from its primary at least every wal_sender_timeout / 2 (30 s by default, keepalives
# included), so 75 s of silence means the stream is dead.
LAG_SQL = (
    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0 "
    "WHEN NOT EXISTS (SELECT 1 FROM pg_stat_wal_receiver) THEN NULL "
    "WHEN EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status <> 'streaming' "
    "OR last_msg_receipt_time < clock_timestamp() - interval '75 seconds') THEN NULL "
    "WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000, 0) END"
)
LAG_REASON = "replication lag"
NOT_STREAMING_REASON = "replication not streaming"
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
    # False while its WAL receiver is not streaming: its lag is then unknown, and too much.
    streaming: bool = True
    reads: Counter[str] = field(default_factory=Counter)
    # True from a failure until a read finds the replica back.
    down: bool = False
    _checking: threading.Lock = field(default_factory=threading.Lock)
    _probing: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lagging(self) -> bool:
        return not self.streaming or (self.lag_ms is not None and self.lag_ms > self.max_lag_ms)

    def connect(self) -> Connection | None:
        """A connection to the replica, or None when reads should go to the primary now.

        Once a failure's REPLICA_RETRY_S is over, one read probes the replica; the others
        keep going to the primary until it found the replica back (against a frozen or
        black-holed standby, only that read pays the connect bound).
        """
        now = time.monotonic()
        if now < self.down_until:
            return None
        due = now - self.lag_checked_at >= LAG_CHECK_INTERVAL_S
        if self.lagging and not due:
            return None
        probe = self.down
        if probe and not self._probing.acquire(blocking=False):
            return None
        try:
            return self._connect(due)
        finally:
            if probe:
                self._probing.release()

    def _connect(self, due: bool) -> Connection | None:
        try:
            # No outage wait: a replica that refuses connections is skipped, not waited for.
            # Pinged at checkout even inside a retried view: a pooled replica connection
            # that died (a restart, sessions ended after a rotation) is replaced here,
            # instead of failing its first read and sending reads to the primary for
            # REPLICA_RETRY_S while the replica is fine.
            with bounds.outage_wait(0), bounds.deadline(REPLICA_CONNECT_S), caller_retries(False):
                conn = db.engines[REPLICA_BIND].connect()
        except (DBAPIError, NoCredentials, sa.exc.TimeoutError) as exc:
            # TimeoutError: its pool stayed full for the pool timeout (a slow replica).
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
            self._lag_measured(None if lag is None else float(lag))
        if self.lagging:
            conn.close()
            return None
        # A failure another read reported while this one connected stands until it expires.
        if self.reason is not None and time.monotonic() >= self.down_until:
            log.info("replica_reads_resumed", after=self.reason)
            self.reason = None
            self.down = False
        return conn

    def mark_down(self, exc: BaseException) -> None:
        """Send reads to the primary for REPLICA_RETRY_S."""
        reason = describe_error(exc)
        if self.reason != reason:
            log.warning("replica_unavailable", reason=reason, retry_in_s=REPLICA_RETRY_S)
        self.reason = reason
        self.down = True
        self.down_until = time.monotonic() + REPLICA_RETRY_S

    def _lag_measured(self, lag_ms: float | None) -> None:
        """Keep a measured lag (None: the standby is not streaming)."""
        was = self.lagging
        self.streaming = lag_ms is not None
        self.lag_ms = lag_ms
        self.lag_checked_at = time.monotonic()
        if not self.streaming and self.reason != NOT_STREAMING_REASON:
            log.warning("replica_not_streaming", max_lag_ms=self.max_lag_ms)
            self.reason = NOT_STREAMING_REASON
        elif lag_ms is not None and self.lagging and not was:
            log.warning("replica_lagging", lag_ms=round(lag_ms), max_lag_ms=self.max_lag_ms)
            self.reason = LAG_REASON

    def status(self) -> dict[str, Any]:
        return {
            "reading": time.monotonic() >= self.down_until and not self.lagging,
            "reason": self.reason,
            "streaming": self.streaming,
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
