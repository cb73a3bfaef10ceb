"""The refresh: fetch, build, test, swap under a lock, then record; and its reactive twin.

One ``Rotator`` owns one bind (engine name): its credential source, the credentials
currently in use, the active engine and the engines still draining. Refreshes are
single-flight: a trigger that arrives while one runs waits for it and shares its
result. Credentials become current only after the swap has succeeded, so a failed
swap is retried at the next check rather than a rotation later.

A refresh serves every caller, so it runs under a deadline of its own, never the
deadline of the request that happened to start it: how callers share one refresh and
wait for it is ``commng_rotation.flight``. What a refresh reports at its end (its event,
its log line) is ``commng_rotation.attempt``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import structlog
from sqlalchemy.engine import Engine

from commng_rotation.attempt import Attempt
from commng_rotation.credentials import (
    AWSCURRENT,
    AWSPENDING,
    Credentials,
    CredentialSource,
    InvalidSecret,
    SecretsUnavailable,
    SecretVersion,
)
from commng_rotation.engines import (
    EngineFactory,
    ManagedEngine,
    describe_error,
    drain,
    error_code,
    is_auth_failure,
    probe,
    retire,
)
from commng_rotation.events import EventLog, Outcome, RotationEvent, Trigger
from commng_rotation.flight import SingleFlight

__all__ = ["Rotator", "RotatorClosed"]

log = structlog.get_logger("commng_rotation.rotator")

# At most one Secrets Manager fetch per second per worker for auth-failure refreshes.
REACTIVE_MIN_INTERVAL_S = 1.0
# How long a caller waits for a refresh that another request or the watcher runs (a
# request: at most until its own deadline).
JOIN_TIMEOUT_S = 15.0
# The refresh's own bound on its database waits (the probe has a shorter one inside it).
REFRESH_DEADLINE_S = JOIN_TIMEOUT_S
PROBE_TIMEOUT_S = 5.0
# Old pools kept draining at once; rotations faster than the grace period close the oldest.
MAX_DRAINING = 2


class RotatorClosed(RuntimeError):
    """The rotator was closed (worker shutdown) while a refresh ran: nothing is installed."""


class Rotator:
    """Credentials, engines and refreshes of one bind."""

    def __init__(
        self,
        *,
        source: CredentialSource,
        factory: EngineFactory,
        install: Callable[[Engine], None],
        grace_s: float,
        events: EventLog,
        bind: str | None = None,
    ) -> None:
        self.source = source
        self.factory = factory
        self.install = install
        self.grace_s = grace_s
        self.events = events
        self.bind = bind
        self.current: SecretVersion | None = None
        self.active: ManagedEngine | None = None
        self.draining: list[ManagedEngine] = []
        self.trigger_counts: Counter[Trigger] = Counter()
        self._swap_lock = threading.Lock()
        self._refreshes: SingleFlight[RotationEvent] = SingleFlight(
            deadline_s=REFRESH_DEADLINE_S, join_timeout_s=JOIN_TIMEOUT_S, thread_name="commng-refresh"
        )
        self._last_reactive: tuple[float, RotationEvent] | None = None
        # After adopting AWSPENDING in the window, the AWSCURRENT version it replaces is
        # known to fail: polls ignore it until AWSCURRENT moves to what we already use.
        self._window_from: str | None = None
        self._stop = threading.Event()
        self._drainers: list[threading.Thread] = []
        factory.on_auth_failure = self.on_auth_failure

    # -- start-up -------------------------------------------------------------------

    def bootstrap(self, fallback: Credentials | None) -> None:
        """Install the first engine: the secret's credentials, else ``fallback``."""
        version: SecretVersion | None
        try:
            version = self.source.fetch(AWSCURRENT)
            if self.source.watchable:
                log.info("credentials_fetched", bind=self.bind, version=version.version_id)
        except (SecretsUnavailable, InvalidSecret) as exc:
            self._record(RotationEvent(Trigger.STARTUP, Outcome.FAILED, self.bind, error=error_code(exc)))
            log.warning(
                "startup_credentials_unavailable",
                bind=self.bind,
                error=error_code(exc),
                reason=describe_error(exc),
                using="static credentials" if fallback else "none until the secret is readable",
            )
            version = SecretVersion(fallback, None) if fallback else None
        self.active = self.factory.build(version.credentials if version else None)
        self.active.reactive = True
        self.install(self.active.engine)
        # Static fallback credentials are not a secret version: the watcher will replace them.
        self.current = version if version and version.version_id else None

    @property
    def credentials(self) -> Credentials | None:
        """The credentials new connections use now."""
        return self.active.credentials if self.active else None

    # -- the watcher's step -----------------------------------------------------------

    def check(self, trigger: Trigger = Trigger.POLL) -> RotationEvent | None:
        """Compare AWSCURRENT's version id with ours; refresh when it moved.

        Returns the refresh's event, or None when nothing changed (a poll records no
        event for "nothing changed"; a manual check does). Raises SecretsUnavailable.
        """
        version_id = self.source.current_version_id()
        if self._window_from is not None and version_id != self._window_from:
            self._window_from = None  # AWSCURRENT moved on: the window is over
        with self._swap_lock:  # a refresh may be installing a newer version meanwhile
            current = self.current
            if current is not None and version_id == current.version_id and current.stage != AWSCURRENT:
                # AWSCURRENT caught up with the AWSPENDING version adopted in the window; what
                # is announced of it from now on (a relayed push) says so.
                self.current = replace(current, stage=AWSCURRENT)
        if self.current is not None and version_id in {self.current.version_id, self._window_from}:
            if trigger == Trigger.MANUAL:
                return self._record(
                    RotationEvent(trigger, Outcome.UNCHANGED, self.bind, version_id, version_id)
                )
            return None
        return self.refresh(trigger)

    # -- single-flight refresh ---------------------------------------------------------

    def refresh(self, trigger: Trigger, failed: Credentials | None = None) -> RotationEvent:
        """Run a refresh, or join the one already running and return its event.

        A caller inside a deadline gets a failed event (``JoinTimeout``) once its deadline
        passes; the refresh itself goes on.
        """
        return self._refresh_or_join(trigger, failed)[0]

    def _refresh_or_join(self, trigger: Trigger, failed: Credentials | None) -> tuple[RotationEvent, bool]:
        """The event, and whether it is the refresh's own (False: this caller stopped waiting)."""

        def killed(exc: BaseException) -> RotationEvent:
            return RotationEvent(trigger, Outcome.FAILED, self.bind, error=type(exc).__name__)

        def detached(event: RotationEvent) -> None:
            # A refresh its caller no longer waits for is still shared (on_auth_failure()).
            if trigger == Trigger.AUTH_FAILURE:
                self._last_reactive = (time.monotonic(), event)

        event = self._refreshes.run_or_join(lambda: self._refresh(trigger, failed), killed, detached)
        if event is None:
            return RotationEvent(trigger, Outcome.FAILED, self.bind, error="JoinTimeout"), False
        return event, True

    def _refresh(self, trigger: Trigger, failed: Credentials | None) -> RotationEvent:
        """Fetch, then either record "unchanged" or adopt the new login; never raises."""
        self.trigger_counts[trigger] += 1
        attempt = Attempt(self.bind, trigger, failed, self.current.version_id if self.current else None)
        try:
            latest = self._fetch_latest(attempt)
            if latest is None:
                return self._record(attempt.unchanged(self.current.version_id if self.current else None))
            attempt.detected(latest)
            latest, swap_ms, old = self._adopt_latest(attempt, latest)
        except Exception as exc:
            return self._record(attempt.failure(exc))
        event = attempt.rotated(latest, swap_ms)
        self._record(event)
        if old is not None:
            self._start_drain(old, event)
        return event

    def _fetch_latest(self, attempt: Attempt) -> SecretVersion | None:
        """The version to adopt, or None when AWSCURRENT holds the login in use."""
        latest = self.source.fetch(AWSCURRENT)
        attempt.detected_at = datetime.now(UTC)
        attempt.current_version = latest.version_id
        if attempt.failed is not None and latest.credentials == attempt.failed:
            # The rotation window: the database already has the new password but
            # AWSCURRENT still holds the old one. AWSPENDING holds the new one.
            return self._fetch_pending(attempt)
        if latest.credentials == self.credentials:
            self.current = latest  # a new version id with the same login: nothing to swap
            log.info(
                "secret_version_unchanged_login",
                bind=self.bind,
                trigger=attempt.trigger,
                new_version=latest.version_id,
            )
            return None
        return latest

    def _fetch_pending(self, attempt: Attempt) -> SecretVersion:
        """AWSPENDING; or AWSCURRENT again when the rotation finished since we read it.

        Secrets Manager's last step moves AWSCURRENT to the new version, then takes
        AWSPENDING off it: between our two reads both can have happened, and AWSPENDING
        is gone (ResourceNotFoundException) while AWSCURRENT now holds the new login.
        """
        attempt.stage = AWSPENDING
        try:
            return self.source.fetch(AWSPENDING)
        except SecretsUnavailable as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            missing = exc
        attempt.stage = AWSCURRENT
        latest = self.source.fetch(AWSCURRENT)
        if latest.credentials == attempt.failed:
            raise missing  # no rotation under way after all: the refused login is all there is
        attempt.current_version = latest.version_id
        log.info("rotation_finished_while_reading", bind=self.bind, new_version=latest.version_id)
        return latest

    def _adopt_latest(
        self, attempt: Attempt, latest: SecretVersion
    ) -> tuple[SecretVersion, float, ManagedEngine | None]:
        """Adopt ``latest``; after a login failure, fall back to AWSPENDING if it fails too."""
        try:
            swap_ms, old = self._adopt(latest, attempt.current_version)
            return latest, swap_ms, old
        except Exception as exc:
            if not (attempt.failed is not None and attempt.stage == AWSCURRENT and is_auth_failure(exc)):
                raise
        attempt.stage = AWSPENDING  # AWSCURRENT moved but fails too: try what comes next
        pending = self.source.fetch(AWSPENDING)
        swap_ms, old = self._adopt(pending, attempt.current_version)
        return pending, swap_ms, old

    def _adopt(
        self, version: SecretVersion, failing_current: str | None
    ) -> tuple[float, ManagedEngine | None]:
        """Build and test an engine for ``version`` and swap it in; return the old one.

        ``failing_current`` is the AWSCURRENT version read by this refresh: when
        ``version`` is AWSPENDING, that one is known to fail, and polls skip it.
        """
        started = time.monotonic()
        candidate = self.factory.build(version.credentials)
        try:
            probe(candidate.engine, PROBE_TIMEOUT_S)
        except BaseException:  # GreenletExit too: a killed refresh leaves no pool behind
            candidate.engine.dispose()
            raise
        with self._swap_lock:
            if self._stop.is_set():
                # close() ran while this refresh fetched and tested: it disposed what was
                # there, and an engine installed now would never be closed.
                candidate.engine.dispose()
                raise RotatorClosed("the rotator was closed during the refresh")
            old = self.active
            if version.stage == AWSPENDING:
                self._window_from = failing_current
            self.install(candidate.engine)
            candidate.reactive = True
            self.active = candidate
            self.current = version
            if old is not None:
                # Engines still draining reconnect, if they must, with what works now.
                for engine in (old, *self.draining):
                    engine.credentials = version.credentials
                self.draining.append(old)
                self._cap_draining()
        return (time.monotonic() - started) * 1000, old

    def _cap_draining(self) -> None:
        """Rotations faster than the grace period: close the oldest pools beyond the cap now."""
        while len(self.draining) > MAX_DRAINING:
            oldest = self.draining.pop(0)
            retire(oldest)  # its checked-out connections close when returned
            log.warning("old_pool_closed_early", bind=self.bind, draining=len(self.draining))

    def _start_drain(self, old: ManagedEngine, event: RotationEvent) -> None:
        def run() -> None:
            drained_ms = drain(old, self.grace_s, self._stop)
            with self._swap_lock:
                if old in self.draining:
                    self.draining.remove(old)
            event.drained_ms = round(drained_ms, 1)
            self.events.updated(event)
            log.info("old_pool_closed", bind=self.bind, drained_ms=round(drained_ms, 1))

        thread = threading.Thread(target=run, name="commng-drain", daemon=True)
        self._drainers = [t for t in self._drainers if t.is_alive()] + [thread]
        thread.start()

    # -- reactive refresh --------------------------------------------------------------

    def on_auth_failure(self, failed: Credentials) -> Credentials | None:
        """Called when a new connection's login fails; returns credentials that work."""
        if not self.source.watchable:
            return None  # static credentials cannot change under us
        now = self.credentials
        if now is not None and now != failed:
            return now  # another refresh already moved on: use its credentials
        last = self._last_reactive
        recent = last is not None and time.monotonic() - last[0] < REACTIVE_MIN_INTERVAL_S
        if recent and last is not None and last[1].outcome != Outcome.ROTATED:
            return None  # share the recent failure instead of asking again
        event, finished = self._refresh_or_join(Trigger.AUTH_FAILURE, failed)
        if finished:
            # Only a refresh's own outcome is shared: a caller that ran out of time says
            # nothing about the refresh, which may still succeed.
            self._last_reactive = (time.monotonic(), event)
        if event.outcome != Outcome.ROTATED:
            return None
        return self.credentials

    # -- bookkeeping --------------------------------------------------------------------

    def _record(self, event: RotationEvent) -> RotationEvent:
        return self.events.record(event)

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel the drain timers and dispose every engine (worker shutdown).

        A refresh still running afterwards installs nothing (RotatorClosed).
        """
        self._stop.set()
        for thread in self._drainers:
            thread.join(timeout_s)
        with self._swap_lock:
            for managed in (*self.draining, self.active):
                if managed is not None:
                    retire(managed)
            self.draining.clear()
