"""The persisted rotation history: one row per refresh attempt of every worker and task.

Writing never blocks or breaks a refresh. The EventLog listeners only queue a snapshot
of the event in a bounded buffer; a writer thread (a greenlet under gunicorn's gevent
worker) upserts the queue in order, with the engine that is current at write time, so
the row of a rotation is written by the engine the rotation just installed. When the
database cannot be written (unreachable, or the login in use is refused) the snapshots
stay queued and the writer retries with backoff; past the bound the oldest are dropped
with a warning that counts them. ``drained_ms`` arrives after the event was recorded:
it is a second snapshot of the same event, upserted on the client-generated id.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as pg_insert

from commng_rotation import bounds
from commng_rotation.engines import error_code
from commng_rotation.events import RotationEvent

__all__ = [
    "HistoryWriter",
    "InvalidCursor",
    "RotationRecord",
    "count_by_trigger",
    "list_events",
    "metadata",
    "rotation_events",
]

log = structlog.get_logger("commng_rotation.history")
# Events kept in memory per worker while the database cannot be written.
BUFFER_MAX = 1000
# Rows per INSERT; the queue is written in order, batch after batch.
BATCH_SIZE = 100
# A history write must never hold a connection for long: the pool serves requests.
STATEMENT_TIMEOUT_MS = 3000
# ...and every wait of a write (connect included) ends by then, even on a silent server.
WRITE_DEADLINE_S = 5.0
PRUNE_EVERY_S = 3600.0
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
STOP_JOIN_TIMEOUT_S = 5.0
# A refresh records its event and its drain adds drained_ms moments later: the writer
# waits this long before its first write so that both usually go in one transaction,
# and it does not compete for the new pool with the requests that follow a swap.
COALESCE_S = 1.0


# The table has a metadata of its own, so that the layer needs none of the host's models.
# Create it with the host's migrations (CommNG: migrations/versions/0002_rotation_events.py
# and 0004_rotation_service.py) or with ``metadata.create_all(engine)``. Several services
# may share one database: each row carries its service (``RotationSettings.service``), and
# each service reads and prunes only its own.
metadata = sa.MetaData()
rotation_events = sa.Table(
    "rotation_events",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("service", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("worker", sa.Text, nullable=False),
    sa.Column("bind", sa.Text),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("old_version", sa.Text),
    sa.Column("new_version", sa.Text),
    sa.Column("detection_latency_ms", sa.Float),
    sa.Column("swap_ms", sa.Float),
    sa.Column("drained_ms", sa.Float),
    sa.Column("error", sa.Text),
)
# Newest first, with the id as the tie-breaker of the pagination cursor.
sa.Index(
    "ix_rotation_events_service_occurred_at",
    rotation_events.c.service,
    rotation_events.c.occurred_at.desc(),
    rotation_events.c.id.desc(),
)


@dataclass(frozen=True)
class RotationRecord:
    """One refresh attempt of one worker, as persisted."""

    id: str
    service: str
    occurred_at: datetime
    worker: str
    bind: str | None
    trigger: str
    outcome: str
    old_version: str | None
    new_version: str | None
    detection_latency_ms: float | None
    swap_ms: float | None
    drained_ms: float | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields: version ids, timings and an error class, never a credential."""
        data = {name: getattr(self, name) for name in _COLUMNS}
        data["occurred_at"] = self.occurred_at.isoformat()
        return data


_COLUMNS = tuple(c.name for c in rotation_events.columns)
_EVENT_COLUMNS = tuple(name for name in _COLUMNS if name != "service")


def _snapshot(event: RotationEvent, service: str) -> dict[str, Any]:
    """The event's fields now (a later drained_ms is a later snapshot)."""
    snap = {name: getattr(event, name) for name in _EVENT_COLUMNS}
    snap["service"] = service
    return snap


def _merge(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per id, first-seen order; later snapshots fill in what they know."""
    rows: dict[str, dict[str, Any]] = {}
    for snap in batch:
        known = rows.get(snap["id"])
        if known is None:
            rows[snap["id"]] = dict(snap)
        else:
            known.update({k: v for k, v in snap.items() if v is not None})
    return list(rows.values())


class HistoryWriter:
    """Queues rotation events and writes them, in order, when the database allows."""

    def __init__(
        self,
        engine: Callable[[], sa.Engine],
        retention: timedelta,
        maxlen: int = BUFFER_MAX,
        service: str = "flask_app",
    ) -> None:
        # Called at each write: the engine the latest refresh installed.
        self._engine = engine
        self.service = service
        self.retention = retention
        self.maxlen = maxlen
        self.dropped = 0
        self.written = 0
        self.last_error: str | None = None
        self.last_written_at: datetime | None = None
        self._pending: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()  # the queue and the thread handle
        self._flush_lock = threading.Lock()  # one writer at a time keeps rows in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune: float | None = None

    # -- the listeners' side: never blocks on the database -------------------------------

    def enqueue(self, event: RotationEvent) -> None:
        """Queue a snapshot of ``event`` and make sure a writer runs."""
        snap = _snapshot(event, self.service)
        dropped = 0
        thread = None
        with self._lock:
            if len(self._pending) >= self.maxlen:
                self._pending.popleft()
                self.dropped += 1
                dropped = self.dropped
            self._pending.append(snap)
            if not self._stop.is_set() and (self._thread is None or not self._thread.is_alive()):
                thread = self._thread = threading.Thread(
                    target=self._run, name="commng-history-writer", daemon=True
                )
        if dropped:
            log.warning(
                "rotation_history_events_dropped",
                message="Rotation history buffer full: the oldest unwritten event was dropped",
                dropped_total=dropped,
                buffer_size=self.maxlen,
            )
        if thread is not None:
            thread.start()

    @property
    def pending(self) -> int:
        """Events queued and not yet written."""
        with self._lock:
            return len(self._pending)

    # -- the writer's side ---------------------------------------------------------------

    def flush(self) -> bool:
        """Write the queue, oldest first; True when it is empty afterwards (the single step)."""
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = list(itertools.islice(self._pending, BATCH_SIZE))
                if not batch:
                    return True
                try:
                    self._write(_merge(batch))
                except Exception as exc:
                    self.last_error = error_code(exc)
                    log.warning(
                        "rotation_history_write_failed",
                        error=self.last_error,
                        pending=self.pending,
                    )
                    return False
                with self._lock:
                    # Only the head leaves the queue (here, or dropped when full).
                    taken = {id(snap) for snap in batch}
                    while self._pending and id(self._pending[0]) in taken:
                        self._pending.popleft()
                self.written += len(batch)
                self.last_error = None
                self.last_written_at = datetime.now(UTC)
                self._maybe_prune()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        table = rotation_events
        stmt = pg_insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.id],
            set_={"drained_ms": sa.func.coalesce(stmt.excluded.drained_ms, table.c.drained_ms)},
        )
        with bounds.deadline(WRITE_DEADLINE_S), self._engine().begin() as conn:
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
            conn.execute(stmt, rows)

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if self._last_prune is not None and now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        try:
            deleted = self.prune()
        except Exception as exc:  # pruning is housekeeping: the next hour tries again
            log.warning("rotation_history_prune_failed", error=error_code(exc))
            return
        if deleted:
            log.info("rotation_history_pruned", deleted=deleted, retention_days=self.retention.days)

    def prune(self) -> int:
        """Delete rows older than the retention limit; return how many went."""
        table = rotation_events
        cutoff = datetime.now(UTC) - self.retention
        with bounds.deadline(WRITE_DEADLINE_S), self._engine().begin() as conn:
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
            result = conn.execute(
                sa.delete(table).where(table.c.service == self.service, table.c.occurred_at < cutoff)
            )
        return int(result.rowcount)

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        try:
            if self._stop.wait(COALESCE_S):
                return  # stop() makes the last attempt itself
            while not self._stop.is_set():
                if self.flush():
                    delay = FIRST_RETRY_S
                    with self._lock:
                        if not self._pending:
                            return  # the next enqueue starts a new writer
                    continue
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, MAX_RETRY_S)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def stop(self) -> None:
        """Stop retrying and make a last attempt to write what is queued (bounded)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(STOP_JOIN_TIMEOUT_S)
        if self.pending:
            self.flush()

    def status(self) -> dict[str, Any]:
        """The writer's figures for the admin status (counts and an error class only)."""
        return {
            "pending": self.pending,
            "buffer_size": self.maxlen,
            "dropped": self.dropped,
            "written": self.written,
            "last_error": self.last_error,
            "last_written_at": self.last_written_at.isoformat() if self.last_written_at else None,
            "retention_days": self.retention.days,
        }


# -- reading ----------------------------------------------------------------------------


class InvalidCursor(ValueError):
    """``before_id`` does not name an event in the history."""


def list_events(
    session: Any, limit: int, before_id: str | None = None, *, service: str | None = None
) -> tuple[list[RotationRecord], str | None]:
    """Up to ``limit`` events of ``service`` newest first, older than ``before_id``; and the next cursor.

    ``session`` is a SQLAlchemy Session or Connection; ``service`` None lists every
    service's. The cursor is the id of the last event of the previous page (the response's
    ``next_before_id``); it is None when there is nothing older.
    """
    t = rotation_events
    query = sa.select(t).order_by(t.c.occurred_at.desc(), t.c.id.desc()).limit(limit + 1)
    if service is not None:
        query = query.where(t.c.service == service)
    if before_id is not None:
        anchor_query = sa.select(t.c.occurred_at, t.c.id).where(t.c.id == before_id)
        if service is not None:
            anchor_query = anchor_query.where(t.c.service == service)
        anchor = session.execute(anchor_query).first()
        if anchor is None:
            raise InvalidCursor(before_id)
        query = query.where(sa.tuple_(t.c.occurred_at, t.c.id) < (anchor.occurred_at, anchor.id))
    rows = [RotationRecord(**row._mapping) for row in session.execute(query)]
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


def count_by_trigger(session: Any, *, service: str | None = None) -> dict[str, dict[str, int]]:
    """{trigger: {outcome: n}} over the retained history of ``service`` (None: every service)."""
    t = rotation_events
    query = sa.select(t.c.trigger, t.c.outcome, sa.func.count()).group_by(t.c.trigger, t.c.outcome)
    if service is not None:
        query = query.where(t.c.service == service)
    counts: dict[str, dict[str, int]] = {}
    for trigger, outcome, n in session.execute(query):
        counts.setdefault(trigger, {})[outcome] = int(n)
    return counts
