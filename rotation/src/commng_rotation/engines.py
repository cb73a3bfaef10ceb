"""Building, testing and draining SQLAlchemy engines.

Every engine this service uses is built by ``EngineFactory.build`` with the same
options, so a replacement engine behaves exactly like the one it replaces. Passwords
never enter a URL: a ``do_connect`` listener hands the engine's current credentials to
psycopg2 for each new physical connection (SQLAlchemy's documented pattern for
rotating credentials), which also lets an engine that is draining reconnect with the
freshest working login. The pool's listeners decide what an error condemns and when a
connection is pinged; ``drain`` and ``retire`` close a replaced engine for good.

What an error means (``describe_error``, ``is_auth_failure``, ...) is
``commng_rotation.errors``; those names are importable from here as well.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg2
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from commng_rotation import bounds
from commng_rotation.credentials import Credentials

# Re-exported: what an error means was importable from here before it had a module of its own.
from commng_rotation.errors import (
    WRITER_ELSEWHERE,
    NoCredentials,
    describe_error,
    error_code,
    is_auth_failure,
    is_transient,
    refusal_cause,
)
from commng_rotation.resolve import with_hostaddr
from commng_rotation.settings import RotationSettings
from commng_rotation.status import PoolFigures

__all__ = [
    "EngineFactory",
    "Login",
    "ManagedEngine",
    "NoCredentials",
    "caller_retries",
    "describe_error",
    "drain",
    "error_code",
    "is_auth_failure",
    "probe",
    "refusal_cause",
    "retire",
]

AuthFailureHandler = Callable[[Credentials], "Credentials | None"]
# Opens one physical connection with these login parameters (user, password, host, ...).
OpenConnection = Callable[[dict[str, Any]], Any]


class Login(Protocol):
    """A credential source that supplies each new connection's password itself (an IAM token).

    The engine's credentials then carry no password: ``connect`` adds one to
    ``credentials.connect_params()`` for every new physical connection and calls
    ``open_connection`` (once, or again after a refusal, as it sees fit).
    """

    # libpq's require_auth for every connection: the authentication the server may ask for.
    require_auth: str

    def connect(self, credentials: Credentials, open_connection: OpenConnection) -> Any: ...


log = structlog.get_logger("commng_rotation.engines")

# How long sent data may stay unacknowledged before the kernel gives up on the peer.
KEEPALIVE_USER_TIMEOUT_MS = 10_000
# Backoff between connection attempts while a request waits out an outage. The cap is what
# a request may lose after the database is back (a failover's new primary reachable): at
# 250 ms, each waiting request makes at most four attempts a second, each one refused or
# failed at once by a server that is down or starting.
OUTAGE_FIRST_RETRY_S = 0.05
OUTAGE_MAX_RETRY_S = 0.25


# True while the code that checks a connection out re-runs its work after a disconnect
# (``commng_rotation.retry_on_disconnect``): the ping before checkout is then a round trip
# that buys nothing, since a dead connection fails the first statement and the work
# runs again on a fresh one. Everywhere else (readiness, admin, history, CLI) pings.
_caller_retries: ContextVar[bool] = ContextVar("commng_caller_retries", default=False)
_FRESH = "commng_fresh"


class caller_retries:  # a class, not a @contextmanager generator: it is entered on every request
    """Inside the block, connections are checked out without the ping (``retries=False``: with it)."""

    __slots__ = ("_retries", "_token")

    def __init__(self, retries: bool = True) -> None:
        self._retries = retries

    def __enter__(self) -> None:
        self._token = _caller_retries.set(self._retries)

    def __exit__(self, *exc_info: object) -> None:
        _caller_retries.reset(self._token)


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

    def pool_figures(self) -> PoolFigures:
        """Size, checked-out, idle and overflow counts of the engine's current pool."""
        pool: Any = self.engine.pool
        return {
            "size": int(pool.size()),
            "checked_out": int(pool.checkedout()),
            "idle": int(pool.checkedin()),
            "overflow": max(0, int(pool.overflow())),
        }


class EngineFactory:
    """Builds engines that all share one set of options and listeners."""

    def __init__(self, settings: RotationSettings) -> None:
        self.settings = settings
        self.on_auth_failure: AuthFailureHandler | None = None
        # Observers (metrics): every engine built, and every login PostgreSQL refused.
        self.build_listeners: list[Callable[[ManagedEngine], None]] = []
        self.auth_failure_listeners: list[Callable[[], None]] = []
        # Told the cause (``refusal_cause``) of every login PostgreSQL refused.
        self.refusal_listeners: list[Callable[[str], None]] = []
        # Where each new connection's password comes from, when not from the credentials.
        self.login: Login | None = None
        # More psycopg2.connect arguments (e.g. a connection_factory), for engines built later.
        self.connect_args: dict[str, Any] = {}

    def options(self) -> dict[str, Any]:
        """Engine options; exposed so tests can prove every engine gets the same ones."""
        s = self.settings
        return {
            "pool_size": s.pool_size,
            "max_overflow": s.max_overflow,
            "pool_timeout": s.pool_timeout_s,
            # A connection lives at most one rotation period: with alternating users
            # (AWSCURRENT flips between <user> and <user>_clone, and each rotation changes
            # the password of the user not in use), a connection opened as one user is
            # closed before the rotation after next changes that user's password.
            "pool_recycle": s.rotation_period_s,
            # A connection killed while idle is noticed before use, then replaced: by the
            # checkout listener's ping (see _listen), or, where the caller retries, by the retry.
            "pool_pre_ping": False,
            # Bind parameters would otherwise appear in exception text and logs.
            "hide_parameters": True,
            "connect_args": {
                "connect_timeout": s.connect_timeout_s,
                "sslmode": s.sslmode,
                **({"sslrootcert": s.ssl_root_cert} if s.ssl_root_cert else {}),
                # The password is only ever sent for SCRAM: a server (or an impostor) asking
                # for cleartext or md5 gets no password, the connection fails instead. An IAM
                # token is sent as RDS asks, in cleartext: inside TLS only (sslmode).
                "require_auth": self.login.require_auth if self.login else "scram-sha-256",
                "application_name": s.application_name,
                "options": f"-c statement_timeout={s.statement_timeout_ms}",
                # A peer that vanished (host gone, route black-holed) is noticed in seconds.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": KEEPALIVE_USER_TIMEOUT_MS,
                **self.connect_args,
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
                    # A name is resolved here, cooperatively and bounded, at every attempt.
                    resolved = with_hostaddr(params, bounds.remaining() or self.settings.connect_timeout_s)
                    return dialect.connect(*cargs, **resolved)
            except dialect.loaded_dbapi.OperationalError as exc:
                until = bounds.outage_deadline()
                left = None if until is None else until - time.monotonic()
                if left is None or left <= 0 or not is_transient(exc):
                    raise
                log.warning(
                    "database_connect_retrying", reason=describe_error(exc), wait_ms=round(delay * 1000)
                )
                time.sleep(min(delay, left))  # bounded by the outage budget; yields under gevent
                delay = min(delay * 2, OUTAGE_MAX_RETRY_S)

    def _refused(self, exc: BaseException) -> None:
        """Tell the listeners that PostgreSQL refused a login."""
        for listener in self.auth_failure_listeners:
            listener()
        cause = refusal_cause(exc)
        for refusal_listener in self.refusal_listeners:
            refusal_listener(cause)

    def _listen(self, managed: ManagedEngine) -> None:
        # The do_connect listener lives on the engine's dialect, and a dialect outlives its
        # engine in caches keyed on it (each ORM mapper keeps up to 100 compiled statements
        # per dialect): held strongly, ``managed`` kept every retired engine and its pools
        # alive. The pool's own listeners (checkin below) keep ``managed`` as long as the
        # engine lives.
        managed_ref = weakref.ref(managed)

        def connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
            managed = managed_ref()
            if managed is None:  # pragma: no cover - the engine's own pool keeps it
                raise NoCredentials("this engine was retired")
            credentials = managed.credentials
            if credentials is None:
                raise NoCredentials("no database credentials are known yet")

            def open_connection(params: dict[str, Any]) -> Any:
                # cparams is shared by every connect of this engine: copy, never mutate.
                try:
                    return self._connect(dialect, cargs, {**cparams, **params})
                except dialect.loaded_dbapi.OperationalError as exc:
                    if is_auth_failure(exc):
                        self._refused(exc)
                    raise

            try:
                if self.login is not None:
                    return self.login.connect(credentials, open_connection)
                return open_connection(credentials.connect_params())
            except dialect.loaded_dbapi.OperationalError as exc:
                auth_failed = is_auth_failure(exc)
                handler = self.on_auth_failure
                if not (managed.reactive and handler and auth_failed):
                    raise
                fresh = handler(credentials)
                if fresh is None:
                    raise
            # One retry, with credentials the refresh has just tested.
            return self._connect(dialect, cargs, {**cparams, **fresh.connect_params()})

        def checkin(dbapi_connection: Any, record: Any) -> None:
            if dbapi_connection is None:
                return
            # Whatever a ``reading()`` block did, the connection goes back with transactions
            # on. First: the retirement below closes the connection, which must not be
            # touched after that (psycopg2 raises InterfaceError out of checkin()).
            if dbapi_connection.autocommit and not dbapi_connection.closed:
                dbapi_connection.autocommit = False
            if managed.retired:
                record.invalidate()

        sa.event.listen(managed.engine, "do_connect", connect)
        sa.event.listen(managed.engine, "checkin", checkin)
        sa.event.listen(managed.engine, "connect", _mark_fresh)
        sa.event.listen(managed.engine, "checkout", _ping_on_checkout)
        sa.event.listen(managed.engine, "handle_error", _invalidate_by_cause)


def _invalidate_by_cause(context: sa.engine.ExceptionContext) -> None:
    """Which connections an error condemns.

    - A wait that gave up closed its own connection: that one, not the whole pool
      (SQLAlchemy takes any closed connection for a disconnect and invalidates every
      connection of the pool; a restart or failover, the server's words, still does).
    - A write refused because the server is no writer: every connection of the pool, as a
      disconnect does (none of them may serve a write again). The pool stays the same
      object, so connections checked out meanwhile are replaced as they come back instead
      of lingering on the old server.
    """
    if context.is_disconnect and bounds.gave_up(context.original_exception):
        context.invalidate_pool_on_disconnect = False
    elif getattr(context.original_exception, "pgcode", None) in WRITER_ELSEWHERE:
        context.is_disconnect = True


def _mark_fresh(dbapi_connection: Any, record: Any) -> None:
    record.info[_FRESH] = True  # just opened: nothing to ping


def _ping_on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """SQLAlchemy's pre-ping, skipped where the caller retries and on a fresh connection.

    A failed ping raises InvalidatePoolError: the pool then invalidates every connection
    older than now and hands out a new one, exactly as ``pool_pre_ping`` does. A ping that
    timed out (this side gave up) replaces that connection only.
    """
    if record.info.pop(_FRESH, False) or _caller_retries.get():
        return
    autocommit = dbapi_connection.autocommit
    try:
        dbapi_connection.autocommit = True  # no BEGIN for the ping (what SQLAlchemy's does)
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except psycopg2.Error as exc:
        if bounds.gave_up(exc):
            raise sa.exc.DisconnectionError(f"ping failed: {describe_error(exc)}") from exc
        raise sa.exc.InvalidatePoolError(f"ping failed: {describe_error(exc)}") from exc
    finally:
        if not dbapi_connection.closed:
            dbapi_connection.autocommit = autocommit


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
    retire(managed)
    return (time.monotonic() - started) * 1000


def retire(managed: ManagedEngine) -> None:
    """Close ``managed``'s pool for good; connections returned to it later are closed.

    Nothing of the engine may stay behind: the ORM forgets what it compiled for its dialect.
    """
    managed.retired = True
    managed.engine.dispose()
    try:
        _forget_dialect(managed.engine.dialect)
    except Exception as exc:  # a newer SQLAlchemy: memory is kept, nothing breaks
        log.warning("orm_cache_cleanup_failed", error=type(exc).__name__)


def _forget_dialect(dialect: Any) -> None:
    """Drop the ORM's compiled statements for ``dialect`` (SQLAlchemy 2.1 internals).

    Each mapper keeps the statements of its flushes in ``Mapper._compiled_cache``, an LRU
    of 100 to 150 entries keyed by ``(dialect, ...)``. Every engine has a dialect of its
    own, so each rotation left its dialect and statements there, about 30 kB, until the
    LRU evicted them. The one place that touches these private names (``_all_registries``,
    ``_compiled_cache``); tests/test_engine_retirement.py fails if they change.
    """
    from sqlalchemy.orm.mapper import _all_registries

    for registry in _all_registries():
        for mapper in list(registry.mappers):
            cache = mapper.__dict__.get("_compiled_cache")  # memoized: absent until a flush
            if cache is None:
                continue
            for key in [k for k in list(cache) if isinstance(k, tuple) and k and k[0] is dialect]:
                cache.pop(key, None)
