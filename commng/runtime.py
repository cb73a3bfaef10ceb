"""Wires credential sources, rotators and the watcher into an app; starts and stops them.

State lives in ``app.extensions["commng.rotation"]``. gunicorn's hooks call
``start_background`` and ``stop_background``; tests drive ``Runtime.watcher.check_once``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from flask import Flask, current_app
from sqlalchemy.engine import Engine

from commng.credentials import (
    EnvSource,
    SecretsManagerSource,
    env_credentials,
    make_secrets_client,
)
from commng.engines import EngineFactory, install_engine
from commng.events import EventLog, worker_name
from commng.models import db
from commng.rotation import Rotator
from commng.watcher import SecretWatcher
from config import Settings

__all__ = ["Runtime", "get_runtime", "init_app", "start_background", "stop_background"]

EXTENSION = "commng.rotation"
log = structlog.get_logger("commng.runtime")


@dataclass
class Runtime:
    """Everything rotation-related for one app in one worker process."""

    settings: Settings
    rotators: dict[str | None, Rotator]
    watcher: SecretWatcher | None
    events: EventLog
    secret_id: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # Called by stop() after the watcher stopped and before the engines close (e.g. the
    # rotation history's last flush, which still needs a working engine).
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)

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
            "secret_id": self.secret_id,
            "watcher": {
                "running": bool(w and w.running),
                "interval_ms": self.settings.db_secret_refresh_interval_ms,
                "last_check_at": w.last_check_at.isoformat() if w and w.last_check_at else None,
                "next_check_at": w.next_check_at.isoformat() if w and w.next_check_at else None,
                "consecutive_failures": w.consecutive_failures if w else 0,
            },
            # The watcher failed DEGRADED_AFTER_FAILURES checks in a row: serving goes on with
            # the current credentials, but a rotation would not be seen until reactive refresh.
            "degraded": bool(w and w.degraded),
            "binds": binds,
        }

    def start(self) -> None:
        """Start the watcher loop, if there is anything to watch; then say this worker is ready."""
        if self.watcher is not None:
            self.watcher.start()
        log.info("worker_ready", watcher=self.watcher is not None)

    def stop(self) -> None:
        """Stop the watcher, cancel drains and dispose every engine."""
        if self.watcher is not None:
            self.watcher.stop()
        for hook in list(self.stop_hooks):
            hook()
        for rotator in self.rotators.values():
            rotator.close()


def _engine_status(managed: Any) -> dict[str, Any]:
    return {"created_at": managed.created_at.isoformat(), "pool": managed.pool_figures()}


def init_app(app: Flask, settings: Settings, secrets_client: Any | None = None) -> Runtime:
    """Choose the credential source, install the first engine, prepare the watcher."""
    if EXTENSION in app.extensions:
        raise RuntimeError("commng.runtime.init_app was already called for this app")
    events = EventLog()
    source: Any
    if settings.db_secret_id:
        client = secrets_client if secrets_client is not None else make_secrets_client(settings)
        source = SecretsManagerSource(client, settings.db_secret_id, settings)
    else:
        source = EnvSource(settings)
        log.info(
            "secret_watcher_disabled",
            message="DB_SECRET_ID is not set: using POSTGRES_USER/POSTGRES_PASSWORD, no watcher",
        )
    with app.app_context():
        flask_sqlalchemy_default = db.engines.get(None)
    rotator = Rotator(
        source=source,
        factory=EngineFactory(settings),
        install=partial(_install_default, app),
        grace_s=settings.db_pool_grace_period_ms / 1000,
        events=events,
    )
    rotator.bootstrap(fallback=env_credentials(settings))
    if flask_sqlalchemy_default is not None:
        flask_sqlalchemy_default.dispose()  # built by Flask-SQLAlchemy, never connected
    watcher = (
        SecretWatcher([rotator], settings.db_secret_refresh_interval_ms / 1000) if source.watchable else None
    )
    runtime = Runtime(settings, {None: rotator}, watcher, events, settings.db_secret_id)
    app.extensions[EXTENSION] = runtime
    return runtime


def _install_default(app: Flask, engine: Engine) -> None:
    install_engine(db, app, None, engine)


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
