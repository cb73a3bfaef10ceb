"""The application factory: one ``init_app`` per concern, in the order they depend on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from flask import Flask
from flask_migrate import Migrate

import commng_rotation as rotation
from commng import admin, api, cli, edge, errors, health, idempotency, observability, tokens
from commng import db as database
from commng.db import db
from commng.observability import logs
from commng_rotation import RotationSettings
from config import Settings, load_settings

__all__ = ["CommNGFlask", "create_app", "replica_rotation_settings", "rotation_settings"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

migrate = Migrate()


class CommNGFlask(Flask):
    """Flask, deciding once per function whether a hook or view is a coroutine.

    Flask calls ``ensure_sync`` on every before/after/teardown hook and on the view, for
    every request, and each call runs ``inspect.iscoroutinefunction`` (four or five
    function calls). This app has a dozen of them per request; the answer never changes
    for a given function, so it is kept. Flask documents ``ensure_sync`` as the method
    to override; coroutine functions still go through ``async_to_sync`` each time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_functions: dict[Any, Any] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync_functions[func]  # type: ignore[no-any-return]
        except KeyError:
            pass
        except TypeError:  # an unhashable callable: ask every time
            return super().ensure_sync(func)
        sync = super().ensure_sync(func)
        if sync is func:
            self._sync_functions[func] = func
        return sync


def create_app(
    config: Settings | None = None,
    *,
    secrets_client: Any | None = None,
    sqs_client: Any | None = None,
    rds_client: Any | None = None,
    configure_logging: bool = True,
) -> Flask:
    """Build the app: settings, logging, database, rotation, observability, routes.

    ``secrets_client``, ``sqs_client``, ``rds_client``: boto3 clients to use instead of the
    ones built from the settings (moto's, or a botocore client, in tests).
    """
    settings = config if config is not None else load_settings()
    # The tokens kept in Secrets Manager (ADMIN_TOKEN_SECRET_ID, METRICS_TOKEN_SECRET_ID), once.
    settings = tokens.load_tokens(settings, secrets_client)
    if configure_logging:
        logs.configure(settings.log_level, settings.log_format)
    else:
        logs.route_to_stdlib()
    app = CommNGFlask(__name__)
    app.config.update(
        COMMNG_SETTINGS=settings,
        MAX_CONTENT_LENGTH=64 * 1024,
        # Flask-SQLAlchemy needs a URL at init; rotation.init_app replaces its engine with
        # one that gets the password at connect time.
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg2://",
    )
    db.init_app(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    rotation.init_app(
        app,
        db,
        rotation_settings(settings),
        secrets_client=secrets_client,
        sqs_client=sqs_client,
        rds_client=rds_client,
        replica=replica_rotation_settings(settings),
    )
    database.init_app(app)
    # Observability first among the request hooks: the request id binds before anything logs.
    observability.init_app(app)
    # The edge next: a request past /admin's or /metrics' prefix stops before any auth.
    edge.init_app(app)
    errors.init_app(app)
    health.init_app(app)
    idempotency.init_app(app)
    api.init_app(app)
    admin.init_app(app)
    cli.init_app(app)
    return app


def rotation_settings(settings: Settings) -> RotationSettings:
    """CommNG's environment, as the rotation layer's settings."""
    return RotationSettings(
        auth=settings.db_auth,
        iam_token_reuse_s=float(settings.db_iam_token_reuse_s),
        secret_id=settings.db_secret_id,
        aws_region=settings.aws_region,
        refresh_interval_s=settings.db_secret_refresh_interval_ms / 1000,
        grace_period_s=settings.db_pool_grace_period_ms / 1000,
        host=settings.postgres_host,
        port=settings.postgres_port,
        dbname=settings.postgres_db,
        username=settings.postgres_user,
        password=settings.postgres_password,
        sslmode=settings.sslmode,
        ssl_root_cert=settings.postgres_ssl_root_cert,
        statement_timeout_ms=settings.postgres_statement_timeout_ms,
        outage_wait_s=settings.db_outage_wait_ms / 1000,
        pool_size=settings.postgres_pool_size,
        max_overflow=settings.postgres_max_overflow,
        pool_timeout_s=settings.postgres_pool_timeout_s,
        connect_timeout_s=settings.postgres_connect_timeout_s,
        rotation_period_s=settings.db_rotation_period_s,
        application_name="commng",
        service="commng",
        history_retention_days=settings.rotation_history_retention_days,
        queue_url=settings.db_rotation_queue_url,
        fanout=settings.db_rotation_fanout,
    )


def replica_rotation_settings(settings: Settings) -> RotationSettings | None:
    """The read replica's rotation settings, or None when no replica is configured.

    Same pools, bounds and TLS as the primary; its own secret when DB_REPLICA_SECRET_ID is
    set, else the primary's login; POSTGRES_REPLICA_HOST/PORT pinned over the secret's.
    """
    if not settings.uses_replica:
        return None
    primary = rotation_settings(settings)
    return replace(
        primary,
        secret_id=settings.db_replica_secret_id or settings.db_secret_id,
        host=settings.postgres_replica_host or primary.host,
        port=settings.postgres_replica_port or primary.port,
        pin_host=settings.postgres_replica_host is not None,
        require_host=settings.db_replica_secret_id is not None,
        application_name="commng-replica",
        queue_url=None,
        fanout=False,
    )
