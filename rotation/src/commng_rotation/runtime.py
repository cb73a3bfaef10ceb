"""One app's rotation state in one worker: the ``Runtime``, and how the host reaches it.

State lives in ``app.extensions["commng_rotation"]`` (the package's name, since
``commng_rotation.init_app``, in ``commng_rotation.extension``, is what puts it there).
gunicorn's hooks call ``start_background`` and ``stop_background``; tests drive
``Runtime.watcher.check_once``. The ``on_*`` methods are the extension points an adopter
attaches metrics to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from flask import Flask, current_app

from commng_rotation.engines import ManagedEngine
from commng_rotation.events import EventLog, RotationEvent, worker_name
from commng_rotation.fanout import FanOut
from commng_rotation.fleet import FleetReporter
from commng_rotation.history import HistoryWriter
from commng_rotation.iam import IamTokenSource, IssuedToken
from commng_rotation.push import PushConsumer
from commng_rotation.rotator import Rotator
from commng_rotation.settings import RotationSettings
from commng_rotation.status import BindStatus, EngineStatus, RuntimeStatus
from commng_rotation.watcher import CheckResult, SecretWatcher

__all__ = [
    "EXTENSION",
    "REPLICA_BIND",
    "Runtime",
    "get_runtime",
    "start_background",
    "stop_background",
]

EXTENSION = "commng_rotation"
# The bind key of the optional read replica (``init_app(..., replica=...)``).
REPLICA_BIND = "replica"
log = structlog.get_logger("commng_rotation.runtime")


@dataclass
class Runtime:
    """Everything rotation-related for one app in one worker process."""

    settings: RotationSettings
    rotators: dict[str | None, Rotator]
    watcher: SecretWatcher | None
    events: EventLog
    history: HistoryWriter
    # The app's Flask-SQLAlchemy extension (``retry_on_disconnect`` and ``reading`` use its session).
    db: Any = None
    # Called by stop() after the watcher stopped and before the engines close (e.g. the
    # rotation history's last flush, which still needs a working engine).
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)
    # SQS push, LISTEN/NOTIFY fan-out, the fleet table (None when not configured).
    push: PushConsumer | None = None
    fanout: FanOut | None = None
    fleet: FleetReporter | None = None

    @property
    def service(self) -> str:
        """The service this app's history and fleet rows carry (``RotationSettings.service``)."""
        return self.settings.service_name

    def rotator(self, bind: str | None = None) -> Rotator:
        """The rotator of ``bind`` (None is the default engine)."""
        return self.rotators[bind]

    # -- extension points: what an adopter attaches metrics or alerts to ---------------------
    # Listeners run in the thread or greenlet that did the work; they must not block. One that
    # raises is logged and does not stop rotation.

    def on_event(self, listener: Callable[[RotationEvent], None], *, replay: bool = False) -> None:
        """Call ``listener`` with every refresh attempt's event (``RotationEvent``).

        ``replay``: first with the events already recorded (the start-up refresh), oldest first.
        """
        if replay:
            for event in reversed(self.events.recent(limit=self.events.maxlen)):
                listener(event)
        self.events.listeners.append(listener)

    def on_event_updated(self, listener: Callable[[RotationEvent], None]) -> None:
        """Call ``listener`` when an event gains a field later (``drained_ms``, after the drain)."""
        self.events.update_listeners.append(listener)

    def on_check(self, listener: Callable[[list[CheckResult]], None]) -> None:
        """Call ``listener`` with each watcher check's results (one ``CheckResult`` per bind).

        Nothing is called when no secret is watched.
        """
        if self.watcher is not None:
            self.watcher.listeners.append(listener)

    def on_engine(self, listener: Callable[[ManagedEngine], None], *, existing: bool = True) -> None:
        """Call ``listener`` with every engine built from now on, of every bind.

        ``existing``: first with each bind's active engine. ``ManagedEngine.engine`` is the
        SQLAlchemy ``Engine``: attach pool events to it.
        """
        for rotator in self.rotators.values():
            rotator.factory.build_listeners.append(listener)
            if existing and rotator.active is not None:
                listener(rotator.active)

    def on_auth_failure(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` for each new connection PostgreSQL refused a login to (28P01/28000)."""
        for rotator in self.rotators.values():
            rotator.factory.auth_failure_listeners.append(listener)

    def on_login_refused(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(source, cause)`` for each login PostgreSQL refused, of every bind.

        ``source`` is the bind's credential source (``secretsmanager``, ``static``, ``iam``);
        ``cause`` the SQLSTATE's condition name (``invalid_password``,
        ``invalid_authorization_specification``, ``other``).
        """
        for rotator in self.rotators.values():
            rotator.factory.refusal_listeners.append(_with_source(rotator.source.name, listener))

    def on_token(self, listener: Callable[[IssuedToken], None]) -> None:
        """Call ``listener`` with each IAM token signed (its issue time and signing cost, never the token).

        Nothing is called unless ``RotationSettings.auth`` is ``"iam"``.
        """
        for rotator in self.rotators.values():
            if isinstance(rotator.source, IamTokenSource):
                rotator.source.listeners.append(listener)

    def refusal_reason(self, bind: str | None = None) -> str | None:
        """Why logins of ``bind`` are refused, when the source knows better than the SQLSTATE.

        With IAM: set when a freshly signed token was refused too (``rds_iam`` missing, a
        token for another host, port, user or region, a skewed clock), cleared by the next
        login that succeeds. None otherwise.
        """
        source = self.rotators[bind].source
        return source.refusal if isinstance(source, IamTokenSource) else None

    def on_upstream_failure(self, listener: Callable[[str], None]) -> None:
        """Call ``listener`` with "RotationFailed" or "RotationAbandoned" when the queue reports one."""
        if self.push is not None:
            self.push.upstream_failure_listeners.append(listener)

    def status(self) -> RuntimeStatus:
        """This worker's view: versions, engines, pools, checks (never a password)."""
        binds: list[BindStatus] = []
        for key, r in self.rotators.items():
            binds.append(
                {
                    "bind": key,
                    "source": r.source.name,
                    "current_version": r.current.version_id if r.current else None,
                    "active_engine": _engine_status(r.active) if r.active else None,
                    "draining_engines": [_engine_status(m) for m in list(r.draining)],
                    "refreshes_by_trigger": {str(k): n for k, n in r.trigger_counts.items()},
                }
            )
        w = self.watcher
        return {
            "worker": worker_name(),
            "service": self.service,
            "secret_id": self.settings.secret_id,
            "watcher": {
                "running": bool(w and w.running),
                "interval_ms": int(self.settings.refresh_interval_s * 1000),
                "last_check_at": w.last_check_at.isoformat() if w and w.last_check_at else None,
                "next_check_at": w.next_check_at.isoformat() if w and w.next_check_at else None,
                "consecutive_failures": w.consecutive_failures if w else 0,
                "restarts": w.restarts if w else 0,
            },
            "degraded": bool(w and w.degraded),
            "binds": binds,
            "push": {"running": self.push.running, "received": self.push.received} if self.push else None,
            "fanout": (
                {
                    "listening": self.fanout.connected,
                    "sent": self.fanout.sent,
                    "received": self.fanout.received,
                    "reconnects": self.fanout.reconnects,
                }
                if self.fanout
                else None
            ),
        }

    def start(self) -> None:
        """Start the watcher loop, if there is anything to watch; then say this worker is ready."""
        if self.watcher is not None:
            self.watcher.start()
        if self.push is not None:
            self.push.start()
        if self.fanout is not None:
            self.fanout.start()
        if self.fleet is not None:
            self.fleet.touch()
        log.info("worker_ready", watcher=self.watcher is not None)

    def stop(self) -> None:
        """Stop the watcher, write what history is queued, cancel drains, dispose every engine."""
        # No new push or notification may start a check once stopping.
        if self.push is not None:
            self.push.stop()
        if self.fanout is not None:
            self.fanout.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for hook in list(self.stop_hooks):
            hook()
        self.history.stop()
        for rotator in self.rotators.values():
            rotator.close()


def _with_source(source: str, listener: Callable[[str, str], None]) -> Callable[[str], None]:
    def refused(cause: str) -> None:
        listener(source, cause)

    return refused


def _engine_status(managed: ManagedEngine) -> EngineStatus:
    return {"created_at": managed.created_at.isoformat(), "pool": managed.pool_figures()}


def get_runtime(app: Flask | None = None) -> Runtime:
    """The Runtime of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    runtime: Runtime = target.extensions[EXTENSION]
    return runtime


def start_background(app: Flask) -> None:
    """gunicorn post_worker_init: start the watcher in this worker."""
    get_runtime(app).start()


def stop_background(app: Flask) -> None:
    """gunicorn worker_exit: stop the watcher and close every pool."""
    get_runtime(app).stop()
