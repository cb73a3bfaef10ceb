"""The pool gauge: connections of this worker's pools (active and draining engines), by state.

Fed by SQLAlchemy pool events on every engine the rotation layer builds (``track_engine``
is one of its build listeners), each connection tracked by its pool record so that no
event counts twice. ``metrics`` registers it and serves it with the other metrics.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from prometheus_client import Gauge

from commng_rotation import ManagedEngine

__all__ = ["POOLS", "POOL_CONNECTIONS", "PUBLISH_DELAY_S", "pool_figures", "track_engine"]

# livesum: the connections of the workers alive now; a dead worker's pools are gone.
POOL_CONNECTIONS = Gauge(
    "commng_db_pool_connections",
    "Connections of this service's pools (active and draining engines), by state.",
    ["state"],
    multiprocess_mode="livesum",
)
# The pool gauge is written at most this long after a pool event (_PoolTracker says why).
PUBLISH_DELAY_S = 1.0


class _PoolTally:
    """One engine's connections, tracked by connection record so no event counts twice."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.open: set[int] = set()
        self.checked_out: set[int] = set()


class _PoolTracker:
    """Every tracked engine of this process; publishes the pool gauge shortly after pool events.

    A checkout and a checkin happen on every request, and each moves two values of the
    gauge (each a locked write to the worker's metrics file). The tallies change at
    once; the gauge is written at most PUBLISH_DELAY_S later, once for a whole burst of
    events: a scrape sees the pools as they were up to that long ago, where the scrape
    interval is many times longer. ``figures()`` and ``render()`` publish at once.
    """

    def __init__(self) -> None:
        # Reentrant: a connection garbage-collected while we hold the lock is checked in
        # by a finalizer running in this very thread.
        self._lock = threading.RLock()
        self._tallies: weakref.WeakSet[_PoolTally] = weakref.WeakSet()
        # What the gauge shows, by state, and its labelled children.
        self._shown: dict[str, int] = {}
        self._children: dict[str, Any] = {}
        self._publish_due = False

    def track(self, engine: sa.Engine) -> None:
        pool: Any = engine.pool
        tally = _PoolTally(int(pool.size()) if hasattr(pool, "size") else 0)
        with self._lock:
            self._tallies.add(tally)
        # The listeners hold the tally: it lives exactly as long as the engine.
        sa.event.listen(engine, "connect", lambda _c, rec: self._change(tally.open.add, rec))
        sa.event.listen(engine, "close", lambda _c, rec: self._change(tally.open.discard, rec))
        sa.event.listen(engine, "checkout", lambda _c, rec, _p: self._change(tally.checked_out.add, rec))
        sa.event.listen(engine, "checkin", lambda _c, rec: self._change(tally.checked_out.discard, rec))
        sa.event.listen(engine, "detach", lambda _c, rec: self._detach(tally, rec))

    # No lock on the event path: a set's add or discard is one step under the GIL, and
    # publish() reads the sets under the lock. Two events racing to schedule a publish
    # at worst publish twice.
    def _change(self, op: Callable[[int], None], record: object) -> None:
        op(id(record))
        if not self._publish_due:
            self._schedule()

    def _detach(self, tally: _PoolTally, record: object) -> None:
        tally.open.discard(id(record))
        tally.checked_out.discard(id(record))
        if not self._publish_due:
            self._schedule()

    def _schedule(self) -> None:
        # A thread under plain Python, a greenlet in a gevent worker (threading is patched).
        self._publish_due = True
        timer = threading.Timer(PUBLISH_DELAY_S, self.publish)
        timer.daemon = True
        timer.start()

    def publish(self) -> None:
        """Write the gauge's values that changed since the last publish."""
        with self._lock:
            self._publish_due = False
            for state, value in self._figures().items():
                if self._shown.get(state) == value:
                    continue
                child = self._children.get(state)
                if child is None:
                    child = self._children[state] = POOL_CONNECTIONS.labels(state)
                child.set(value)
                self._shown[state] = value

    def figures(self) -> dict[str, int]:
        """checked_out, idle and overflow summed over the tracked engines (published first)."""
        with self._lock:
            self.publish()
            return self._figures()

    def _figures(self) -> dict[str, int]:
        checked_out = idle = overflow = 0
        for tally in list(self._tallies):
            out = len(tally.checked_out & tally.open)
            checked_out += out
            idle += len(tally.open) - out
            overflow += max(0, len(tally.open) - tally.size)
        return {"checked_out": checked_out, "idle": idle, "overflow": overflow}


POOLS = _PoolTracker()


def track_engine(managed: ManagedEngine) -> None:
    """Feed the pool gauges from ``managed``'s pool events (call before it connects)."""
    POOLS.track(managed.engine)


def pool_figures() -> dict[str, int]:
    """What the pool gauges of this process show now (tests compare it with the pools)."""
    return POOLS.figures()
