"""Building, testing and draining SQLAlchemy engines.

Every engine this service uses is built by ``EngineFactory.build`` with the same
options, so a replacement engine behaves exactly like the one it replaces. Passwords
never enter a URL: a ``do_connect`` listener hands the engine's current credentials to
psycopg2 for each new physical connection (SQLAlchemy's documented pattern for
rotating credentials), which also lets an engine that is draining reconnect with the
freshest working login.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from commng.rotation import bounds
from commng.rotation.credentials import Credentials, InvalidSecret
from commng.rotation.settings import RotationSettings

__all__ = [
    "EngineFactory",
    "ManagedEngine",
    "NoCredentials",
    "describe_error",
    "drain",
    "error_code",
    "is_auth_failure",
    "probe",
]

AuthFailureHandler = Callable[[Credentials], "Credentials | None"]

log = structlog.get_logger("commng.rotation.engines")

# How long sent data may stay unacknowledged before the kernel gives up on the peer.
KEEPALIVE_USER_TIMEOUT_MS = 10_000
# Backoff between connection attempts while a request waits out an outage.
OUTAGE_FIRST_RETRY_S = 0.05
OUTAGE_MAX_RETRY_S = 1.0


class NoCredentials(RuntimeError):
    """No database credentials are known yet (Secrets Manager unreachable at start)."""


@dataclass(eq=False)
class ManagedEngine:
    """An engine plus what this service knows about it."""

    engine: Engine
    credentials: Credentials | None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Candidates under test do not trigger the reactive refresh (it would re-enter it).
    reactive: bool = False
    # Once retired, a connection returned to this engine's pool is closed, not kept.
    retired: bool = False

    def pool_figures(self) -> dict[str, int]:
        """Size, checked-out, idle and overflow counts of the engine's current pool."""
        pool: Any = self.engine.pool
        return {
            "size": int(pool.size()),
            "checked_out": int(pool.checkedout()),
            "idle": int(pool.checkedin()),
            "overflow": max(0, int(pool.overflow())),
        }


def is_auth_failure(exc: BaseException) -> bool:
    """True for PostgreSQL's 'password authentication failed' (SQLSTATE 28P01)."""
    orig = getattr(exc, "orig", exc)
    if getattr(orig, "pgcode", None) in {"28P01", "28000"}:
        return True
    return "password authentication failed" in str(orig)


def error_code(exc: BaseException) -> str:
    """Class and code only: exception messages may carry details we do not control."""
    code = getattr(getattr(exc, "orig", None), "pgcode", None) or getattr(exc, "code", None)
    if is_auth_failure(exc):
        code = "28P01"
    return f"{type(exc).__name__}:{code}" if code else type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """A short, safe explanation for logs (InvalidSecret messages never hold values)."""
    if isinstance(exc, InvalidSecret | NoCredentials):
        return str(exc)
    if is_auth_failure(exc):
        return "password authentication failed"
    return error_code(exc)


class EngineFactory:
    """Builds engines that all share one set of options and listeners."""

    def __init__(self, settings: RotationSettings) -> None:
        self.settings = settings
        self.on_auth_failure: AuthFailureHandler | None = None
        # Observers (metrics): every engine built, and every login PostgreSQL refused.
        self.build_listeners: list[Callable[[ManagedEngine], None]] = []
        self.auth_failure_listeners: list[Callable[[], None]] = []

    def options(self) -> dict[str, Any]:
        """Engine options; exposed so tests can prove every engine gets the same ones."""
        s = self.settings
        return {
            "pool_size": s.pool_size,
            "max_overflow": s.max_overflow,
            "pool_timeout": s.pool_timeout_s,
            # A connection killed while idle is noticed before use, then replaced.
            "pool_pre_ping": True,
            # Bind parameters would otherwise appear in exception text and logs.
            "hide_parameters": True,
            "connect_args": {
                "connect_timeout": s.connect_timeout_s,
                "sslmode": s.sslmode,
                **({"sslrootcert": s.ssl_root_cert} if s.ssl_root_cert else {}),
                # The password is only ever sent for SCRAM: a server (or an impostor) asking
                # for cleartext or md5 gets no password, the connection fails instead.
                "require_auth": "scram-sha-256",
                "application_name": s.application_name,
                "options": f"-c statement_timeout={s.statement_timeout_ms}",
                # A peer that vanished (host gone, route black-holed) is noticed in seconds.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": KEEPALIVE_USER_TIMEOUT_MS,
            },
        }

    def build(self, credentials: Credentials | None) -> ManagedEngine:
        """A new engine for ``credentials``; no connection is opened yet."""
        url = sa.URL.create(
            "postgresql+psycopg2",
            username=credentials.username if credentials else None,
            host=credentials.host if credentials else self.settings.host,
            port=credentials.port if credentials else self.settings.port,
            database=credentials.dbname if credentials else self.settings.dbname,
        )
        engine = sa.create_engine(url, **self.options())
        managed = ManagedEngine(engine, credentials)
        self._listen(managed)
        for listener in self.build_listeners:
            listener(managed)
        return managed

    def _connect(self, dialect: Any, cargs: Any, params: dict[str, Any]) -> Any:
        """One physical connection, bounded by the connect timeout, waiting out a short outage."""
        delay = OUTAGE_FIRST_RETRY_S
        while True:
            try:
                with bounds.deadline(self.settings.connect_timeout_s):
                    return dialect.connect(*cargs, **params)
            except dialect.loaded_dbapi.OperationalError as exc:
                until = bounds.outage_deadline()
                left = None if until is None else until - time.monotonic()
                if left is None or left <= 0 or not bounds.is_transient_connect_failure(exc):
                    raise
                log.warning(
                    "database_connect_retrying", reason=describe_error(exc), wait_ms=round(delay * 1000)
                )
                time.sleep(min(delay, left))  # bounded by the outage budget; yields under gevent
                delay = min(delay * 2, OUTAGE_MAX_RETRY_S)

    def _listen(self, managed: ManagedEngine) -> None:
        def connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
            credentials = managed.credentials
            if credentials is None:
                raise NoCredentials("no database credentials are known yet")
            # cparams is shared by every connect of this engine: copy, never mutate.
            try:
                return self._connect(dialect, cargs, {**cparams, **credentials.connect_params()})
            except dialect.loaded_dbapi.OperationalError as exc:
                auth_failed = is_auth_failure(exc)
                if auth_failed:
                    for listener in self.auth_failure_listeners:
                        listener()
                handler = self.on_auth_failure
                if not (managed.reactive and handler and auth_failed):
                    raise
                fresh = handler(credentials)
                if fresh is None:
                    raise
            # One retry, with credentials the refresh has just tested.
            return self._connect(dialect, cargs, {**cparams, **fresh.connect_params()})

        def checkin(dbapi_connection: Any, record: Any) -> None:
            if managed.retired and dbapi_connection is not None:
                record.invalidate()

        sa.event.listen(managed.engine, "do_connect", connect)
        sa.event.listen(managed.engine, "checkin", checkin)


def probe(engine: Engine, timeout_s: float) -> None:
    """Connect and run SELECT 1; every wait of it ends within ``timeout_s``."""
    with bounds.deadline(timeout_s), engine.connect() as conn:
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        conn.exec_driver_sql("SELECT 1")
        conn.rollback()


def drain(managed: ManagedEngine, grace_s: float, stop: threading.Event) -> float:
    """Wait until nothing is checked out (at most ``grace_s``), then close the pool.

    Connections still checked out after the grace period keep working and are closed
    when they are returned (the checkin listener). Returns the milliseconds waited.
    """
    started = time.monotonic()
    deadline = started + grace_s
    pool: Any = managed.engine.pool
    while pool.checkedout() > 0 and time.monotonic() < deadline:
        if stop.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            break
    managed.retired = True
    managed.engine.dispose()
    return (time.monotonic() - started) * 1000
