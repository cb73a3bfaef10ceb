"""``init_app``: validate the settings, choose the credential sources, install the first
engines, and wire the watcher, history, fleet, push and fan-out into one ``Runtime``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from flask import Flask
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from commng_rotation import bounds, compat
from commng_rotation.credentials import (
    CredentialSource,
    SecretsManagerSource,
    SecretVersion,
    StaticSource,
    make_secrets_client,
    static_credentials,
)
from commng_rotation.engines import (
    EngineFactory,
    ManagedEngine,
    NoCredentials,
    caller_retries,
    describe_error,
    probe,
)
from commng_rotation.events import EventLog, Outcome, RotationEvent, Trigger
from commng_rotation.fanout import FanOut
from commng_rotation.fleet import FleetReporter
from commng_rotation.history import HistoryWriter
from commng_rotation.iam import IamTokenSource, IssuedToken, make_rds_client, rds_signer
from commng_rotation.push import PushConsumer, make_sqs_client
from commng_rotation.rotator import Rotator
from commng_rotation.runtime import EXTENSION, REPLICA_BIND, Runtime
from commng_rotation.settings import InvalidSettings, RotationSettings
from commng_rotation.watcher import SecretWatcher
from commng_rotation.xid import XidConnection, note_anchor

__all__ = ["ConnectionCheckFailed", "init_app"]

# A silent server is given this much beyond the statement timeout before a wait gives up.
WAIT_MARGIN_S = 1.0
log = structlog.get_logger("commng_rotation.runtime")


def init_app(
    app: Flask,
    db: Any,
    settings: RotationSettings,
    secrets_client: Any | None = None,
    sqs_client: Any | None = None,
    replica: RotationSettings | None = None,
    connect_args: Mapping[str, Any] | None = None,
    check_connection: bool = False,
    rds_client: Any | None = None,
) -> Runtime:
    """Choose the credential source, install the first engine, prepare watcher and history.

    ``db`` is the app's Flask-SQLAlchemy extension, already initialised for ``app``.
    ``settings`` (and ``replica``) are validated first: ``InvalidSettings`` names the field.
    ``secrets_client`` / ``sqs_client``: boto3 clients to use instead of the ones built from
    the settings (a moto client in the host's tests, or one with the host's own botocore
    config). ``check_connection``: log in once on every bind before returning, and raise
    ``ConnectionCheckFailed`` with the reason when that fails (by default a database that
    is down at start-up is waited for by the requests, not by the start-up).
    ``replica``: a read replica's settings; its engine is bind ``"replica"`` (its own
    rotator, polled by the same watcher, recorded in the same history). Only ``settings``
    decide the watcher's interval, the queue and fan-out; the queue's events for the
    replica's secret start a check of the replica, and fan-out announces its adoptions
    over the primary (a standby refuses NOTIFY). ``connect_args``: more ``psycopg2.connect``
    arguments for every connection of every bind, the first engine's included
    (``factory.connect_args`` of each rotator afterwards). Connections are made with
    ``commng_rotation.xid.XidConnection``, which the in-doubt COMMIT protection of
    ``retry_on_disconnect`` needs; a ``connection_factory`` handed in must subclass it.
    ``rds_client``: with ``settings.auth == "iam"``, the boto3 RDS client that signs the
    tokens (default: one built from the settings, in this process).

    Also registered: a teardown that closes the request's session even when its backend
    died after the view returned (the ROLLBACK would raise, and an exception out of
    teardown turns a complete response into a 500).
    """
    if EXTENSION in app.extensions:
        raise RuntimeError("commng_rotation.init_app was already called for this app")
    _validate(settings, replica)
    compat.check(db, app)
    # Process-wide: every psycopg2 wait is bounded from now on (see bounds).
    bounds.install(default_wait_s=settings.statement_timeout_ms / 1000 + WAIT_MARGIN_S)
    events = EventLog()
    clients: dict[str, Any] = {}

    def source_for(bind_settings: RotationSettings) -> CredentialSource:
        if bind_settings.auth == "iam":
            if "rds" not in clients:
                clients["rds"] = rds_client if rds_client is not None else make_rds_client(bind_settings)
            return IamTokenSource(rds_signer(clients["rds"]), bind_settings)
        if not bind_settings.secret_id:
            return StaticSource(bind_settings)
        if "client" not in clients:
            made = secrets_client if secrets_client is not None else make_secrets_client(bind_settings)
            clients["client"] = made
        return SecretsManagerSource(clients["client"], bind_settings.secret_id, bind_settings)

    source = source_for(settings)
    if isinstance(source, IamTokenSource):
        log.info(
            "secret_watcher_disabled",
            message="IAM database authentication: a token per new connection, no watcher",
        )
    elif not source.watchable:
        log.info(
            "secret_watcher_disabled",
            message="No secret to watch: using the static username and password, no watcher",
        )
    extra = _connect_args(connect_args)
    rotator = _rotator(app, db, None, settings, source, events, extra)
    history = HistoryWriter(
        _active_engine(rotator),
        timedelta(days=settings.history_retention_days),
        service=settings.service_name,
    )
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
    runtime = Runtime(settings, rotators, watcher, events, history, db=db)
    # Each watched bind's secret (the replica may share the primary's), to route queue events.
    by_bind = {None: settings, REPLICA_BIND: replica}
    secrets = {r.bind: s.secret_id for r in watched if (s := by_bind[r.bind]) and s.secret_id}
    _attach_fleet(runtime, settings, sqs_client, secrets)
    if check_connection:
        _check_connections(runtime)
    # Registered after Flask-SQLAlchemy's own teardown, so it runs before it (Flask runs
    # teardowns in reverse): the session is already removed when Flask-SQLAlchemy looks.
    app.teardown_appcontext(_session_remover(db))
    app.extensions[EXTENSION] = runtime
    return runtime


def _validate(settings: RotationSettings, replica: RotationSettings | None) -> None:
    settings.validate()
    if replica is not None:
        try:
            replica.validate()
        except InvalidSettings as exc:
            raise InvalidSettings(f"replica: {exc}") from None


def _connect_args(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The host's ``connect_args`` with the connection class the retry needs."""
    args: dict[str, Any] = {"connection_factory": XidConnection, **(given or {})}
    factory = args["connection_factory"]
    if not (isinstance(factory, type) and issubclass(factory, XidConnection)):
        raise InvalidSettings(
            "connect_args['connection_factory'] must subclass commng_rotation.xid.XidConnection "
            "(retry_on_disconnect needs it to judge a COMMIT cut by a disconnect)"
        )
    return args


class ConnectionCheckFailed(RuntimeError):
    """``init_app(check_connection=True)``: a bind could not log in (the message says why)."""


def _check_connections(runtime: Runtime) -> None:
    for bind, rotator in runtime.rotators.items():
        managed = rotator.active
        try:
            if managed is None or managed.credentials is None:
                raise NoCredentials("no database credentials are known yet")
            with caller_retries(False):
                probe(managed.engine, timeout_s=rotator.factory.settings.connect_timeout_s + 1)
        except Exception as exc:
            runtime.stop()
            where = "the default bind" if bind is None else f"bind {bind!r}"
            raise ConnectionCheckFailed(f"{where} could not log in: {describe_error(exc)}") from None
        log.info("connection_checked", bind=bind)


def _listen_for_anchor(managed: ManagedEngine) -> None:
    sa.event.listen(managed.engine, "connect", note_anchor)


def _session_remover(db: Any) -> Callable[[BaseException | None], None]:
    def remove_session(_: BaseException | None) -> None:
        try:
            db.session.remove()
        except DBAPIError as err:
            log.warning("session_close_failed", error=describe_error(err))
            db.session.registry.clear()

    return remove_session


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
    if isinstance(source, IamTokenSource):
        factory.login = source
    # Each new connection reads its server's anchor, which a COMMIT's verdict is checked against.
    factory.build_listeners.append(_listen_for_anchor)
    rotator = Rotator(
        source=source,
        factory=factory,
        install=lambda engine: compat.install_engine(db, app, bind, engine),
        grace_s=settings.grace_period_s,
        events=events,
        bind=bind,
    )
    if isinstance(source, IamTokenSource):
        source.listeners.append(_token_recorder(rotator))
    return rotator


def _token_recorder(rotator: Rotator) -> Callable[[IssuedToken], None]:
    """Record each new IAM token of ``rotator``'s bind like an adoption: ``iam:<issue time>``.

    Nothing is swapped or drained (the engine and its connections stay); the history and
    the fleet show the token's issue time as the version, never the token.
    """

    def record(issued: IssuedToken) -> None:
        current = rotator.current
        old = current.version_id if current else None
        credentials = rotator.credentials
        if credentials is not None:
            rotator.current = SecretVersion(credentials, issued.version, issued.issued_at)
        event = RotationEvent(Trigger.TOKEN, Outcome.ROTATED, rotator.bind, old, issued.version)
        rotator.events.record(event)

    return record


# -- push (SQS), fan-out (LISTEN/NOTIFY), the fleet table -------------------------------------


def _attach_fleet(
    runtime: Runtime, settings: RotationSettings, sqs_client: Any | None, secrets: dict[str | None, str]
) -> None:
    """Wire push, fan-out and the fleet reporter; each only where a secret is watched.

    ``secrets``: each watched bind's secret id, for routing the queue's events.
    """
    watcher = runtime.watcher
    tokens = settings.auth == "iam"
    if not tokens and (watcher is None or not settings.secret_id):
        return
    rotators = list(runtime.rotators.values())
    fleet = FleetReporter(
        _active_engine(rotators[0]),
        rotators,
        watcher,
        settings.refresh_interval_s,
        service=settings.service_name,
        # No watcher's checks to report after: the fleet row is refreshed on a timer.
        heartbeat=watcher is None,
    )
    if watcher is not None:
        watcher.listeners.append(fleet.on_checks)
    runtime.events.listeners.append(fleet.on_event)
    runtime.stop_hooks.append(fleet.stop)
    runtime.fleet = fleet
    if watcher is None:
        return  # IAM: nothing rotates, so nothing to push or fan out
    if settings.fanout:
        # Every watched bind's adoptions, sent and heard over the primary (a standby refuses NOTIFY).
        fanout = FanOut([runtime.rotators[None], *watcher.rotators], watcher, settings.channel)
        runtime.events.listeners.append(fanout.on_event)
        runtime.fanout = fanout
    if settings.queue_url:
        client = sqs_client if sqs_client is not None else make_sqs_client(settings)
        push = PushConsumer(client, settings.queue_url, secrets, watcher)
        if runtime.fanout is not None:
            push.relay_listeners.append(runtime.fanout.announce)
        runtime.push = push


def _active_engine(rotator: Rotator) -> Callable[[], Engine]:
    def engine() -> Engine:
        if rotator.active is None:
            raise RuntimeError("no engine is installed yet")
        return rotator.active.engine  # whatever the latest refresh installed

    return engine
