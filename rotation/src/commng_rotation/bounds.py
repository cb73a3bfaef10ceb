"""Every wait on PostgreSQL has a bound, under gevent too; short outages are waited out.

psycopg2 hands every wait (connect, send, receive) to a process-wide callback once one
is installed, and a gevent worker needs one: a blocking libpq call would stall every
greenlet of the worker. psycogreen's callback waits with no timeout, and libpq does not
enforce ``connect_timeout`` on that path: against a host that accepts and never answers,
a worker waited forever. This module's callback waits on the socket (with gevent's own
``wait_read``/``wait_write`` once gevent has patched ``select``: one watcher per wait,
where the patched ``select.select`` builds several; with ``select.select`` in a plain
thread) and never past the current deadline:

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
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg2
import psycopg2.extensions

__all__ = ["deadline", "install", "outage_deadline", "outage_wait", "remaining"]

_deadline: ContextVar[float | None] = ContextVar("commng_db_deadline", default=None)
_outage_until: ContextVar[float | None] = ContextVar("commng_db_outage_until", default=None)
_default_wait_s = 30.0


def _timed_out() -> psycopg2.OperationalError:
    return psycopg2.OperationalError("timeout expired")


def _select_wait(fd: int, write: bool, timeout_s: float) -> None:
    """Wait until ``fd`` is ready, or raise the timeout (a plain thread, or a patched select)."""
    readable, writable, _ = select.select([] if write else [fd], [fd] if write else [], [], timeout_s)
    if not (readable or writable):
        raise _timed_out()


def _gevent_waiter() -> Callable[[int, bool, float], None]:
    """The same wait as one gevent io watcher (what psycogreen's callback does, bounded)."""
    from gevent.socket import wait_read, wait_write

    def gevent_wait(fd: int, write: bool, timeout_s: float) -> None:
        (wait_write if write else wait_read)(fd, timeout=timeout_s, timeout_exc=_timed_out())

    return gevent_wait


_wait_for_fd: Callable[[int, bool, float], None] = _select_wait


def _gevent_patched_select() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("select"))


def install(default_wait_s: float) -> None:
    """Use the bounded wait for every psycopg2 connection of this process (idempotent).

    Call it after gevent's ``patch_all`` when there is one (the service's wsgi.py does):
    the wait is then gevent's own.
    """
    global _default_wait_s, _wait_for_fd
    _default_wait_s = default_wait_s
    _wait_for_fd = _gevent_waiter() if _gevent_patched_select() else _select_wait
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
            raise _timed_out()
        if state == psycopg2.extensions.POLL_READ:
            _wait_for_fd(conn.fileno(), False, left)
        elif state == psycopg2.extensions.POLL_WRITE:
            _wait_for_fd(conn.fileno(), True, left)
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
