"""Every wait on PostgreSQL has a bound, under gevent too; short outages are waited out.

psycopg2 hands every wait (connect, send, receive) to a process-wide callback once one
is installed, and a gevent worker needs one: a blocking libpq call would stall every
greenlet of the worker. psycogreen's callback waits with no timeout, and libpq does not
enforce ``connect_timeout`` on that path: against a host that accepts and never answers,
a worker waited forever. This module's callback waits with ``select.select`` (cooperative
once gevent has patched ``select``, blocking in a plain thread) and never past the current
deadline:

- ``deadline(seconds)`` sets one around a piece of work (a connect, a probe, a request);
  nested deadlines only ever shorten it;
- outside any deadline, one wait lasts at most ``default_wait_s`` (the statement timeout
  plus a margin: a silent server is noticed even where nobody set a deadline); a deadline,
  once set, is the bound, shorter or longer.

A wait that runs out raises ``OperationalError("timeout expired")``, libpq's own words
for a connect timeout, and psycopg2 closes that connection, so SQLAlchemy invalidates it
and no half-open connection goes back to the pool.

``outage_wait(seconds)`` marks work that may wait out a short outage: while it is open,
a connection attempt that fails for a transient reason (refused, timed out, the server
starting up or shutting down, a name that does not resolve yet) is retried with backoff
until the outage budget is spent. Nothing was sent on a connection that never opened,
so the retry cannot duplicate a write.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg2
import psycopg2.extensions

__all__ = ["deadline", "install", "outage_deadline", "outage_wait", "remaining"]

_deadline: ContextVar[float | None] = ContextVar("commng_db_deadline", default=None)
_outage_until: ContextVar[float | None] = ContextVar("commng_db_outage_until", default=None)
_default_wait_s = 30.0


def install(default_wait_s: float) -> None:
    """Use the bounded wait for every psycopg2 connection of this process (idempotent)."""
    global _default_wait_s
    _default_wait_s = default_wait_s
    psycopg2.extensions.set_wait_callback(_wait)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """No database wait inside the block lasts past ``seconds`` from now (or an outer deadline)."""
    until = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(until if outer is None else min(outer, until))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (None when there is none)."""
    until = _deadline.get()
    return None if until is None else until - time.monotonic()


@contextmanager
def outage_wait(seconds: float) -> Iterator[None]:
    """Inside the block, connection attempts wait out a transient outage for up to ``seconds``."""
    token = _outage_until.set(time.monotonic() + seconds if seconds > 0 else None)
    try:
        yield
    finally:
        _outage_until.reset(token)


def outage_deadline() -> float | None:
    """The monotonic time until which connection attempts may be retried (None: not at all)."""
    return _outage_until.get()


def _wait(conn: Any) -> None:
    """psycopg2's wait callback: poll, and wait on the socket at most until the deadline."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = remaining()
        if left is None:
            left = _default_wait_s
        if left <= 0:
            raise psycopg2.OperationalError("timeout expired")
        fd = conn.fileno()
        if state == psycopg2.extensions.POLL_READ:
            ready, _, _ = select.select([fd], [], [], left)
        elif state == psycopg2.extensions.POLL_WRITE:
            _, ready, _ = select.select([], [fd], [], left)
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
        if not ready:
            raise psycopg2.OperationalError("timeout expired")
