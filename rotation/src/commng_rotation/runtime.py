"""Wires a credential source, a rotator, the watcher and the history into one app.

State lives in ``app.extensions["commng_rotation"]`` (the package's name, since
``commng_rotation.init_app`` is what puts it there). gunicorn's hooks call
``start_background`` and ``stop_background``; tests drive ``Runtime.watcher.check_once``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from flask import Flask, current_app
from sqlalchemy.engine import Engine

from commng_rotation import bounds, compat
from commng_rotation.credentials import (
    CredentialSource,
    SecretsManagerSource,
    StaticSource,
    make_secrets_client,
    static_credentials,
)
from commng_rotation.engines import EngineFactory, ManagedEngine
from commng_rotation.events import EventLog, worker_name
from commng_rotation.fanout import FanOut
from commng_rotation.fleet import FleetReporter
from commng_rotation.history import HistoryWriter
from commng_rotation.push import PushConsumer, make_sqs_client
from commng_rotation.rotator import Rotator
from commng_rotation.settings import RotationSettings
from commng_rotation.watcher import SecretWatcher

__all__ = [
    "EXTENSION",
    "REPLICA_BIND",
    "Runtime",
    "get_runtime",
    "init_app",
    "start_background",
    "stop_background",
]

EXTENSION = "commng_rotation"
# The bind key of the optional read replica (``init_app(..., replica=...)``).
REPLICA_BIND = "replica"
# A silent server is given this much beyond the statement timeout before a wait gives up.
WAIT_MARGIN_S = 1.0
log = structlog.get_logger("commng_rotation.runtime")


@dataclass
class Runtime:
    """Everything rotation-related for one app in one worker process."""

    settings: RotationSettings
    rotators: dict[str | None, Rotator]
    watcher: SecretWatcher | None
    events: EventLog
    history: HistoryWriter
    # Called by stop() after the watcher stopped and before the engines close (e.g. the
    # rotation history's last flush, which still needs a working engine).
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)
    # Issue 13: SQS push, LISTEN/NOTIFY fan-out, the fleet table (None when not configured).
    push: PushConsumer | None = None
    fanout: FanOut | None = None
    fleet: FleetReporter | None = None

    def rotator(self, bind: str | None = None) -> Rotator:
        """The rotator of ``bind`` (None is the default engine)."""
        return self.rotators[bind]

    def status(self) -> dict[str, Any]:
        """This worker's view: versions, engines, pools, checks (never a password)."""
        binds = []
        for key, r in self.rotators.items():
            binds.append(
                {
                    "bind": key,
                    "source": r.source.name,
                    "current_version": r.current.version_id if r.current else None,
                    "active_engine": _engine_status(r.active) if r.active else None,
                    "draining_engines": [_engine_status(m) for m in list(r.draining)],
                    "refreshes_by_trigger": dict(r.trigger_counts),
                }
            )
        w = self.watcher
        return {
            "worker": worker_name(),
            "secret_id": self.settings.secret_id,
            "watcher": {
                "running": bool(w and w.running),
                "interval_ms": int(self.settings.refresh_interval_s * 1000),
                "last_check_at": w.last_check_at.isoformat() if w and w.last_check_at else None,
                "next_check_at": w.next_check_at.isoformat() if w and w.next_check_at else None,
                "consecutive_failures": w.consecutive_failures if w else 0,
            },
            # The watcher failed DEGRADED_AFTER_FAILURES checks in a row: serving goes on with
            # the current credentials, but a rotation would not be seen until reactive refresh.
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
        # -- issue 13: push loop, listener, first fleet row --
        if self.push is not None:
            self.push.start()
        if self.fanout is not None:
            self.fanout.start()
        if self.fleet is not None:
            self.fleet.touch()
        # -- end issue 13 --
        log.info("worker_ready", watcher=self.watcher is not None)

    def stop(self) -> None:
        """Stop the watcher, write what history is queued, cancel drains, dispose every engine."""
        # -- issue 13: no new push or notification may start a check once stopping --
        if self.push is not None:
            self.push.stop()
        if self.fanout is not None:
            self.fanout.stop()
        # -- end issue 13 --
        if self.watcher is not None:
            self.watcher.stop()
        for hook in list(self.stop_hooks):
            hook()
        self.history.stop()
        for rotator in self.rotators.values():
            rotator.close()


def _engine_status(managed: ManagedEngine) -> dict[str, Any]:
    return {"created_at": managed.created_at.isoformat(), "pool": managed.pool_figures()}


def init_app(
    app: Flask,
    db: Any,
    settings: RotationSettings,
    secrets_client: Any | None = None,
    sqs_client: Any | None = None,
    replica: RotationSettings | None = None,
    connect_args: Mapping[str, Any] | None = None,
) -> Runtime:
    """Choose the credential source, install the first engine, prepare watcher and history.

    ``db`` is the app's Flask-SQLAlchemy extension, already initialised for ``app``.
    ``replica``: a read replica's settings; its engine is bind ``"replica"`` (its own
    rotator, polled by the same watcher, recorded in the same history). Only ``settings``
    decide the watcher's interval, the queue and fan-out; the queue's events for the
    replica's secret start a check of the replica, and fan-out announces its adoptions
    over the primary (a standby refuses NOTIFY). ``connect_args``: more ``psycopg2.connect``
    arguments (e.g. a ``connection_factory``) for every connection of every bind, the
    first engine's included (``factory.connect_args`` of each rotator afterwards).
    """
    if EXTENSION in app.extensions:
        raise RuntimeError("commng_rotation.init_app was already called for this app")
    compat.check(db, app)
    # Process-wide: every psycopg2 wait is bounded from now on (see bounds).
    bounds.install(default_wait_s=settings.statement_timeout_ms / 1000 + WAIT_MARGIN_S)
    events = EventLog()
    clients: dict[str, Any] = {}

    def source_for(bind_settings: RotationSettings) -> CredentialSource:
        if not bind_settings.secret_id:
            return StaticSource(bind_settings)
        if "client" not in clients:
            made = secrets_client if secrets_client is not None else make_secrets_client(bind_settings)
            clients["client"] = made
        return SecretsManagerSource(clients["client"], bind_settings.secret_id, bind_settings)

    source = source_for(settings)
    if not source.watchable:
        log.info(
            "secret_watcher_disabled",
            message="No secret to watch: using the static username and password, no watcher",
        )
    extra = dict(connect_args or {})
    rotator = _rotator(app, db, None, settings, source, events, extra)
    history = HistoryWriter(_active_engine(rotator), timedelta(days=settings.history_retention_days))
    # Listen before the first refresh, so that the start-up attempt is persisted too.
    events.listeners.append(history.enqueue)
    events.update_listeners.append(history.enqueue)
    rotators: dict[str | None, Rotator] = {None: rotator}
    if replica is not None:
        rotators[REPLICA_BIND] = _rotator(app, db, REPLICA_BIND, replica, source_for(replica), events, extra)
    for bind, each in rotators.items():
        with app.app_context():
            flask_sqlalchemy_engine = db.engines.get(bind)
        each_settings = replica if bind == REPLICA_BIND and replica is not None else settings
        each.bootstrap(fallback=static_credentials(each_settings))
        if flask_sqlalchemy_engine is not None:
            flask_sqlalchemy_engine.dispose()  # built by Flask-SQLAlchemy, never connected
    watched = [r for r in rotators.values() if r.source.watchable]
    watcher = SecretWatcher(watched, settings.refresh_interval_s) if watched else None
    runtime = Runtime(settings, rotators, watcher, events, history)
    # Each watched bind's secret (the replica may share the primary's), to route queue events.
    by_bind = {None: settings, REPLICA_BIND: replica}
    secrets = {r.bind: s.secret_id for r in watched if (s := by_bind[r.bind]) and s.secret_id}
    _attach_fleet(runtime, settings, sqs_client, secrets)
    app.extensions[EXTENSION] = runtime
    return runtime


def _rotator(
    app: Flask,
    db: Any,
    bind: str | None,
    settings: RotationSettings,
    source: CredentialSource,
    events: EventLog,
    connect_args: dict[str, Any],
) -> Rotator:
    """The rotator of ``bind``, installing its engines as Flask-SQLAlchemy's ``bind``."""
    factory = EngineFactory(settings)
    factory.connect_args.update(connect_args)
    return Rotator(
        source=source,
        factory=factory,
        install=lambda engine: compat.install_engine(db, app, bind, engine),
        grace_s=settings.grace_period_s,
        events=events,
        bind=bind,
    )


# -- issue 13: push (SQS), fan-out (LISTEN/NOTIFY), the fleet table ----------------------------


def _attach_fleet(
    runtime: Runtime, settings: RotationSettings, sqs_client: Any | None, secrets: dict[str | None, str]
) -> None:
    """Wire push, fan-out and the fleet reporter; each only where a secret is watched.

    ``secrets``: each watched bind's secret id, for routing the queue's events.
    """
    watcher = runtime.watcher
    if watcher is None or not settings.secret_id:
        return
    rotators = list(runtime.rotators.values())
    fleet = FleetReporter(_active_engine(rotators[0]), rotators, watcher, settings.refresh_interval_s)
    watcher.listeners.append(fleet.on_checks)
    runtime.events.listeners.append(fleet.on_event)
    runtime.stop_hooks.append(fleet.stop)
    runtime.fleet = fleet
    if settings.fanout:
        # Every watched bind's adoptions, sent and heard over the primary (a standby refuses NOTIFY).
        fanout = FanOut([runtime.rotators[None], *watcher.rotators], watcher, settings.notify_channel)
        runtime.events.listeners.append(fanout.on_event)
        runtime.fanout = fanout
    if settings.queue_url:
        client = sqs_client if sqs_client is not None else make_sqs_client(settings)
        push = PushConsumer(client, settings.queue_url, secrets, watcher)
        if runtime.fanout is not None:
            push.relay_listeners.append(runtime.fanout.announce)
        runtime.push = push


# -- end issue 13 ---------------------------------------------------------------------------------


def _active_engine(rotator: Rotator) -> Callable[[], Engine]:
    def engine() -> Engine:
        if rotator.active is None:
            raise RuntimeError("no engine is installed yet")
        return rotator.active.engine  # whatever the latest refresh installed

    return engine


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
