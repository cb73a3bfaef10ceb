"""The per-worker secret watcher: a thin loop around ``check_once()``.

Each check costs one DescribeSecret per bind; GetSecretValue is called only when the
AWSCURRENT version id moved. The interval has ±10 % jitter so that workers and tasks
do not poll in lockstep; after a failure the next check comes sooner (1 s, 2 s, 4 s…)
and backs off exponentially up to the interval, however long the failures last. A loop
that crashes (a bug, not a failed check: those are results) is logged and restarted.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog

from commng_rotation.credentials import SecretsUnavailable
from commng_rotation.events import Outcome, Trigger
from commng_rotation.rotator import Rotator

__all__ = ["DEGRADED_AFTER_FAILURES", "CheckResult", "SecretWatcher"]

log = structlog.get_logger("commng_rotation.watcher")

FIRST_RETRY_S = 1.0
# A watcher that has failed this many checks in a row shows as degraded in the status.
DEGRADED_AFTER_FAILURES = 3
# 2**20 s is weeks, beyond any interval: a higher exponent only risks OverflowError
# (float(2**1024) raises), which once ended the loop after 1,025 failed checks.
MAX_BACKOFF_EXPONENT = 20


@dataclass(frozen=True)
class CheckResult:
    """What one check of one bind found; ``outcome`` is the refresh's, when one ran."""

    bind: str | None
    change: Literal["unchanged", "changed", "error"]
    outcome: Outcome | None = None
    error: str | None = None
    # True when Secrets Manager could not be asked; ``error`` is then its error code.
    unavailable: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON for the admin API and the CLI (``change`` is published as ``result``)."""
        return {
            "bind": self.bind,
            "result": self.change,
            "outcome": self.outcome,
            "error": self.error,
            "unavailable": self.unavailable,
        }


class SecretWatcher:
    """Polls every watchable rotator; never raises out of its loop."""

    def __init__(
        self,
        rotators: list[Rotator],
        interval_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.rotators = [r for r in rotators if r.source.watchable]
        self.interval_s = interval_s
        self.rng = rng or random.Random()
        self.consecutive_failures = 0
        # Times the loop crashed and was started again (shown nowhere else: a bug to report).
        self.restarts = 0
        self.last_check_at: datetime | None = None
        self.next_check_at: datetime | None = None
        self.last_results: list[CheckResult] = []
        # Told the results of every check (metrics); a failing listener is not our failure.
        self.listeners: list[Callable[[list[CheckResult]], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(
        self, trigger: Trigger = Trigger.POLL, binds: Collection[str | None] | None = None
    ) -> list[CheckResult]:
        """Check every bind once (or only ``binds``); the single step the loop repeats and tests call."""
        results = []
        for rotator in self.rotators:
            if binds is not None and rotator.bind not in binds:
                continue
            try:
                event = rotator.check(trigger)
            except SecretsUnavailable as exc:
                log.warning("secret_check_failed", bind=rotator.bind, error=exc.code)
                results.append(CheckResult(rotator.bind, "error", error=exc.code, unavailable=True))
                continue
            except Exception as exc:  # a bug here must not kill the watcher
                log.exception("secret_check_crashed", bind=rotator.bind, error=type(exc).__name__)
                results.append(CheckResult(rotator.bind, "error", error=type(exc).__name__))
                continue
            if event is None:
                results.append(CheckResult(rotator.bind, "unchanged"))
            elif event.outcome == Outcome.UNCHANGED and event.old_version == event.new_version:
                results.append(CheckResult(rotator.bind, "unchanged", event.outcome))  # manual check
            else:
                results.append(CheckResult(rotator.bind, "changed", event.outcome, event.error))
        failed = any(r.change == "error" or r.outcome == Outcome.FAILED for r in results)
        if failed:
            self.consecutive_failures += 1
        elif binds is None:  # a check of some binds says nothing of the others
            self.consecutive_failures = 0
        # Times the loop crashed and was started again (shown nowhere else: a bug to report).
        self.restarts = 0
        self.last_check_at = datetime.now(UTC)
        self.last_results = results
        for listener in list(self.listeners):
            try:
                listener(results)
            except Exception:
                log.exception("check_listener_failed", listener=getattr(listener, "__name__", "?"))
        return results

    @property
    def degraded(self) -> bool:
        """True after DEGRADED_AFTER_FAILURES failed checks in a row (serving goes on)."""
        return self.consecutive_failures >= DEGRADED_AFTER_FAILURES

    def next_delay_s(self) -> float:
        """Seconds to the next check: jittered interval, or the backoff after failures."""
        if self.consecutive_failures:
            exponent = min(self.consecutive_failures - 1, MAX_BACKOFF_EXPONENT)
            backoff = FIRST_RETRY_S * float(2**exponent)
            return min(self.interval_s, backoff)
        return self.interval_s * self.rng.uniform(0.9, 1.1)

    @property
    def running(self) -> bool:
        """True while the loop is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the loop (a greenlet under gunicorn's gevent worker, which patches threading)."""
        if self.running or not self.rotators:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="commng-secret-watcher", daemon=True)
        self._thread.start()
        log.info("auto_refresh_started", interval_ms=int(self.interval_s * 1000))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop and wait for it (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        """The loop, restarted after a crash until stopped; the pause bounds a crash loop."""
        while True:
            try:
                self._loop()
                return
            except Exception as exc:
                self.restarts += 1
                self.consecutive_failures += 1  # the status shows degraded if it keeps crashing
                log.exception("secret_watcher_restarted", error=type(exc).__name__, restarts=self.restarts)
            if self._stop.wait(min(self.interval_s, FIRST_RETRY_S)):
                return

    def _loop(self) -> None:
        while True:
            delay = self.next_delay_s()
            self.next_check_at = datetime.now(UTC) + timedelta(seconds=delay)
            if self._stop.wait(delay):
                return
            started = time.monotonic()
            self.check_once()
            log.debug("secret_checked", duration_ms=round((time.monotonic() - started) * 1000, 1))
