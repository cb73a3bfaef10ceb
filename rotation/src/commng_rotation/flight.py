"""Single-flight: one run at a time, shared by every caller that asks while it runs.

The rotator's refreshes go through here. A run serves every caller, so it runs under a
deadline of its own, never the deadline of the caller that happened to start it. A
caller with a deadline (a request) waits for the run at most until its own deadline,
the one that started it too: the run then goes on in a thread of its own (a greenlet
under gevent) after the caller gives up. A caller without one (the watcher, the CLI)
runs it in its own thread and waits for it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from commng_rotation import bounds

__all__ = ["Flight", "SingleFlight"]

T = TypeVar("T")


class Flight(Generic[T]):
    """The run in progress; joiners wait on it and read its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None


class SingleFlight(Generic[T]):
    """At most one run at a time; callers that arrive meanwhile share its result."""

    def __init__(self, *, deadline_s: float, join_timeout_s: float, thread_name: str) -> None:
        self.deadline_s = deadline_s
        self.join_timeout_s = join_timeout_s
        self.thread_name = thread_name
        self.flight: Flight[T] | None = None
        self._lock = threading.Lock()
        # Runs for callers that stopped waiting (see run_or_join()).
        self._threads: list[threading.Thread] = []

    def run_or_join(
        self,
        run: Callable[[], T],
        killed: Callable[[BaseException], T],
        detached_result: Callable[[T], None],
    ) -> T | None:
        """``run()``'s result, or that of the run in progress; None once the caller's deadline passed.

        ``killed`` turns what ``run`` raised into the result its joiners read (the caller
        that runs it gets the exception). ``detached_result`` is told the result of a run
        that went on in a thread of its own, whether or not its caller still waits.
        """
        with self._lock:
            flight = self.flight
            leader = flight is None
            if flight is None:
                flight = self.flight = Flight()
        left = bounds.remaining()
        if leader and left is None:
            return self._fly(flight, run, killed)  # no deadline to keep: the watcher, the CLI
        if leader:
            # In a copy of the caller's context: its log fields (the request id) stay on the
            # run's lines; its deadline does not (the run sets its own).
            context = contextvars.copy_context()
            thread = threading.Thread(
                target=context.run,
                args=(self._fly_detached, flight, run, killed, detached_result),
                name=self.thread_name,
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
        wait_s = self.join_timeout_s if left is None else max(0.0, min(self.join_timeout_s, left))
        if flight.done.wait(wait_s) and flight.result is not None:
            return flight.result
        return None

    def _fly(self, flight: Flight[T], run: Callable[[], T], killed: Callable[[BaseException], T]) -> T:
        """Run ``flight`` under its own deadline; tell the joiners; may raise."""
        try:
            with bounds.own_deadline(self.deadline_s):
                result = flight.result = run()
        except BaseException as exc:  # killed (GreenletExit): joiners learn why, not "JoinTimeout"
            flight.result = killed(exc)
            raise
        finally:
            with self._lock:
                self.flight = None
            flight.done.set()
        return result

    def _fly_detached(
        self,
        flight: Flight[T],
        run: Callable[[], T],
        killed: Callable[[BaseException], T],
        detached_result: Callable[[T], None],
    ) -> None:
        """``_fly`` in a thread of its own: what its caller no longer waits for is still told."""
        try:
            self._fly(flight, run, killed)
        finally:
            if flight.result is not None:
                detached_result(flight.result)
