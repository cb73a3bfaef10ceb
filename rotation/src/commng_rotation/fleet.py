"""The fleet view: which worker of which task runs on which secret version, seen from the database.

Each worker upserts one row per bind into ``rotation_workers`` after every check and every
adoption: its name (host:pid), the version in use, its last check and last refresh, and
``updated_at`` from the database's clock (tasks' clocks may differ). Like the history,
writing never blocks a check: the listeners only start a short-lived writer thread (a
greenlet under gevent) that writes the latest state ``DELAY_S`` later, once more if it
changed meanwhile.
The writer also deletes, at most ``AGE_OUT_BATCH`` at a time, the rows of workers that
have not written for ``STALE_INTERVALS`` refresh intervals (dead or scaled-in), and a
worker that stops deletes its own rows. The table shares the history's metadata
(migration ``0003_rotation_workers``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as pg_insert

from commng_rotation.engines import error_code
from commng_rotation.events import Outcome, RotationEvent, worker_name
from commng_rotation.history import metadata, rotation_events
from commng_rotation.rotator import Rotator
from commng_rotation.watcher import CheckResult, SecretWatcher

__all__ = [
    "STALE_INTERVALS",
    "FleetReporter",
    "WorkerState",
    "list_workers",
    "recent_rotations",
    "rotation_workers",
]

log = structlog.get_logger("commng_rotation.fleet")

# A worker that has not written for this many refresh intervals is gone.
STALE_INTERVALS = 3
AGE_OUT_BATCH = 100
STATEMENT_TIMEOUT_MS = 3000
STOP_JOIN_TIMEOUT_S = 3.0
DEFAULT_BIND = ""  # the default engine's bind (None) as a primary-key value
# The writer waits this long after a touch: it never competes for a new pool with the
# requests that follow a swap, and it comes after the history writer's own first write
# (1 s), so the two reuse one pooled connection instead of growing the pool.
DELAY_S = 2.0

rotation_workers = sa.Table(
    "rotation_workers",
    metadata,
    sa.Column("service", sa.Text, primary_key=True),
    sa.Column("worker", sa.Text, primary_key=True),
    sa.Column("bind", sa.Text, primary_key=True),
    sa.Column("current_version", sa.Text),
    sa.Column("last_check_at", sa.DateTime(timezone=True)),
    sa.Column("last_refresh_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("ix_rotation_workers_updated_at", rotation_workers.c.updated_at)


@dataclass(frozen=True)
class WorkerState:
    """One worker's bind, as the fleet table holds it."""

    service: str
    worker: str
    bind: str | None
    current_version: str | None
    last_check_at: datetime | None
    last_refresh_at: datetime | None
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "service": self.service,
            "worker": self.worker,
            "bind": self.bind,
            "current_version": self.current_version,
        }
        for name in ("last_check_at", "last_refresh_at", "updated_at"):
            value = getattr(self, name)
            data[name] = value.isoformat() if value else None
        return data


class FleetReporter:
    """Writes this worker's row per bind after checks and adoptions; ages out the dead."""

    def __init__(
        self,
        engine: Callable[[], sa.Engine],
        rotators: list[Rotator],
        watcher: SecretWatcher | None,
        interval_s: float,
        service: str = "flask_app",
        heartbeat: bool = False,
    ) -> None:
        self._engine = engine
        # True where no watcher's checks prompt a write (IAM tokens): the writer then also
        # writes every ``interval_s``, so a live worker never ages out of the view.
        self.heartbeat = heartbeat
        self.service = service
        self.rotators = rotators
        self.watcher = watcher
        self.interval_s = interval_s
        self.written = 0
        self.aged_out = 0
        self.last_error: str | None = None
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- listeners: never block -----------------------------------------------------------

    def on_checks(self, results: list[CheckResult]) -> None:
        """SecretWatcher listener: every check is a heartbeat."""
        self.touch()

    def on_event(self, event: RotationEvent) -> None:
        """EventLog listener: an adoption outside a check (reactive) changes the version."""
        if event.outcome == Outcome.ROTATED:
            self.touch()

    def touch(self) -> None:
        """Have the current state written soon, by a writer thread started if none runs."""
        self._dirty.set()
        with self._lock:
            if self._stopped or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._run, name="commng-fleet-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # Bounded: one write, plus one per touch that arrived during it; with the heartbeat,
        # one more every interval until stop() (which sets _dirty to wake it).
        while not self._stopped:
            if not self._dirty.is_set():
                if not self.heartbeat:
                    return
                self._dirty.wait(self.interval_s)
                if self._stopped:
                    return
            if self._stopping.wait(DELAY_S):
                return
            self._dirty.clear()
            self.report_once()

    # -- the single step ------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """This worker's state per bind (no timestamps from the database yet)."""
        last_check = self.watcher.last_check_at if self.watcher is not None else None
        return [
            {
                "worker": worker_name(),
                "service": self.service,
                "bind": r.bind if r.bind is not None else DEFAULT_BIND,
                "current_version": r.current.version_id if r.current else None,
                "last_check_at": last_check,
                "last_refresh_at": r.active.created_at if r.active else None,
            }
            for r in self.rotators
        ]

    def report_once(self) -> bool:
        """Upsert this worker's rows and age out stale ones; False (logged) when it failed."""
        t = rotation_workers
        stmt = pg_insert(t).values(updated_at=sa.func.now())
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.service, t.c.worker, t.c.bind],
            set_={
                "current_version": stmt.excluded.current_version,
                "last_check_at": stmt.excluded.last_check_at,
                "last_refresh_at": stmt.excluded.last_refresh_at,
                "updated_at": sa.func.now(),
            },
        )
        cutoff = sa.func.now() - timedelta(seconds=self.interval_s * STALE_INTERVALS)
        # Only this service's rows: another service on the database has its own interval.
        stale = (
            sa.select(t.c.service, t.c.worker, t.c.bind)
            .where(t.c.service == self.service, t.c.updated_at < cutoff)
            .limit(AGE_OUT_BATCH)
        )
        try:
            with self._engine().begin() as conn:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                for row in self.rows():
                    conn.execute(stmt, row)
                aged = conn.execute(
                    sa.delete(t).where(sa.tuple_(t.c.service, t.c.worker, t.c.bind).in_(stale))
                )
        except Exception as exc:  # the next check writes again
            self.last_error = error_code(exc)
            log.warning("rotation_fleet_write_failed", error=self.last_error)
            return False
        self.written += 1
        self.last_error = None
        if aged.rowcount:
            self.aged_out += int(aged.rowcount)
            log.info("rotation_fleet_aged_out", workers=int(aged.rowcount), after_intervals=STALE_INTERVALS)
        return True

    def stop(self) -> None:
        """Stop writing and delete this worker's rows (it is leaving the fleet); bounded."""
        self._stopping.set()
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._dirty.set()  # wakes a heartbeat that waits for its next interval
        if thread is not None:
            thread.join(STOP_JOIN_TIMEOUT_S)
        t = rotation_workers
        try:
            with self._engine().begin() as conn:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                conn.execute(sa.delete(t).where(t.c.service == self.service, t.c.worker == worker_name()))
        except Exception as exc:  # it ages out after STALE_INTERVALS anyway
            log.warning("rotation_fleet_forget_failed", error=error_code(exc))


# -- reading ----------------------------------------------------------------------------


def list_workers(session: Any, max_age: timedelta, *, service: str | None = None) -> list[WorkerState]:
    """The worker rows of ``service`` (None: every service) written within ``max_age`` (database clock)."""
    t = rotation_workers
    query = (
        sa.select(t)
        .where(t.c.updated_at >= sa.func.now() - max_age)
        .order_by(t.c.service, t.c.worker, t.c.bind)
        .limit(10_000)
    )
    if service is not None:
        query = query.where(t.c.service == service)
    states = []
    for row in session.execute(query):
        data = dict(row._mapping)
        data["bind"] = data["bind"] or None
        states.append(WorkerState(**data))
    return states


def recent_rotations(
    session: Any, rotations: int = 3, max_rows: int = 500, *, service: str | None = None
) -> list[dict[str, Any]]:
    """The ``rotated`` events of ``service``'s newest ``rotations`` versions, oldest first (a timeline)."""
    t = rotation_events
    mine = [t.c.service == service] if service is not None else []
    newest = (
        sa.select(t.c.new_version)
        .where(t.c.outcome == Outcome.ROTATED.value, t.c.new_version.is_not(None), *mine)
        .group_by(t.c.new_version)
        .order_by(sa.func.max(t.c.occurred_at).desc())
        .limit(rotations)
    )
    query = (
        sa.select(
            t.c.worker,
            t.c.bind,
            t.c.trigger,
            t.c.new_version,
            t.c.occurred_at,
            t.c.detection_latency_ms,
            t.c.swap_ms,
            t.c.drained_ms,
        )
        .where(t.c.outcome == Outcome.ROTATED.value, t.c.new_version.in_(newest), *mine)
        .order_by(t.c.occurred_at)
        .limit(max_rows)
    )
    return [dict(row._mapping) for row in session.execute(query)]
