"""Every wait on PostgreSQL has a bound, under gevent too; short outages are waited out.

psycopg2 hands every wait (connect, send, receive) to a process-wide callback once one
is installed, and a gevent worker needs one: a blocking libpq call would stall every
greenlet of the worker. psycogreen's callback waits with no timeout, and libpq does not
enforce ``connect_timeout`` on that path: against a host that accepts and never answers,
a worker waited forever. This module's callback waits on the socket (once gevent has
patched ``select``, on an io watcher and a timer watcher of gevent's loop; with
``select.select`` in a plain thread) and never past the current deadline:

- ``deadline(seconds)`` sets one around a piece of work (a connect, a probe, a request);
  nested deadlines only ever shorten it;
- ``own_deadline(seconds)`` sets one that ignores any outer deadline, for work done on
  behalf of many callers (the credential refresh): it must not fail because the request
  that happened to start it had little time left;
- outside any deadline, one wait lasts at most ``default_wait_s`` (the statement timeout
  plus a margin: a silent server is noticed even where nobody set a deadline); a deadline,
  once set, is the bound, shorter or longer.

A wait that runs out raises ``OperationalError("timeout expired")``, libpq's own words
for a connect timeout, and psycopg2 closes that connection, so SQLAlchemy invalidates it
and no half-open connection goes back to the pool. ``gave_up(exc)`` recognises it: the
engines invalidate only that connection, not the whole pool (a slow server is no reason
to reconnect every idle connection).

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
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import psycopg2
import psycopg2.extensions

__all__ = ["deadline", "gave_up", "install", "outage_deadline", "outage_wait", "own_deadline", "remaining"]

_deadline: ContextVar[float | None] = ContextVar("commng_db_deadline", default=None)
_outage_until: ContextVar[float | None] = ContextVar("commng_db_outage_until", default=None)
_default_wait_s = 30.0


_TIMED_OUT = "timeout expired"


def _timed_out() -> psycopg2.OperationalError:
    return psycopg2.OperationalError(_TIMED_OUT)


def gave_up(exc: BaseException) -> bool:
    """True when a bounded wait ran out (or libpq's connect timeout): this side stopped waiting.

    Not a server or network failure: those come with other words (and a dead peer that
    TCP gave up on says "timed out", not this).
    """
    orig = getattr(exc, "orig", None) or exc
    return isinstance(orig, psycopg2.OperationalError) and str(orig).strip() == _TIMED_OUT


def _select_wait(fd: int, write: bool, timeout_s: float) -> None:
    """Wait until ``fd`` is ready, or raise the timeout (a plain thread, or a patched select)."""
    readable, writable, _ = select.select([] if write else [fd], [fd] if write else [], [], timeout_s)
    if not (readable or writable):
        raise _timed_out()


def _gevent_waiter() -> Callable[[int, bool, float], None]:
    """The same wait as gevent's ``wait_read``/``wait_write`` with a timeout, in fewer steps.

    One io watcher and one timer watcher on the hub's loop, whichever fires first wakes
    this greenlet; psycogreen's callback uses the io watcher alone. gevent's own
    ``wait_read(fd, timeout=...)`` arms a ``gevent.Timeout`` (a Python object with a
    context manager around the wait) and needs the timeout exception built up front:
    9.3-10.3 us of CPU per wait on a ready socket here, against 5.8-5.9 for this one and
    5.2 for the unbounded wait (``python -m bench.waits``).
    """
    from gevent import get_hub
    from gevent.exceptions import InvalidSwitchError
    from gevent.hub import Waiter

    def gevent_wait(fd: int, write: bool, timeout_s: float) -> None:
        hub = get_hub()
        io = hub.loop.io(fd, 2 if write else 1)
        timer = hub.loop.timer(timeout_s)
        waiter = Waiter(hub)
        io.start(waiter.switch, io)
        # From the loop time now: a cached one can be stale by the CPU work since the loop last
        # ran, and the wait would end that much early.
        timer.start(waiter.switch, timer, update=True)
        try:
            fired = waiter.get()
        finally:
            io.close()
            timer.close()
        if fired is timer:
            raise _timed_out()
        if fired is not io:
            raise InvalidSwitchError(f"woken by {fired!r} while waiting on a database socket")

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


class deadline:  # a class, not a @contextmanager generator: it is entered on every request
    """No database wait inside the block lasts past ``seconds`` from now (or an outer deadline)."""

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        until = time.monotonic() + self._seconds
        outer = _deadline.get()
        self._token = _deadline.set(until if outer is None or until < outer else outer)

    def __exit__(self, *exc_info: object) -> None:
        _deadline.reset(self._token)


class own_deadline:
    """No database wait inside the block lasts past ``seconds`` from now, whatever the outer deadline.

    Nested ``deadline`` blocks inside it shorten it as usual; on exit the outer one is back.
    """

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        self._token = _deadline.set(time.monotonic() + self._seconds)

    def __exit__(self, *exc_info: object) -> None:
        _deadline.reset(self._token)


def remaining() -> float | None:
    """Seconds left before the current deadline (None when there is none)."""
    until = _deadline.get()
    return None if until is None else until - time.monotonic()


class outage_wait:  # a class, not a @contextmanager generator: it is entered on every request
    """Inside the block, connection attempts wait out a transient outage for up to ``seconds``."""

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        seconds = self._seconds
        self._token = _outage_until.set(time.monotonic() + seconds if seconds > 0 else None)

    def __exit__(self, *exc_info: object) -> None:
        _outage_until.reset(self._token)


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
