"""CommNG: channels and messages, with database credentials that rotate without downtime."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_migrate import Migrate

from commng import admin, api, bench_routes, cli, errors, health, history, logs, observability, runtime
from commng.models import db
from config import Settings, load_settings

__all__ = ["create_app"]

migrate = Migrate()


def create_app(
    config: Settings | None = None,
    *,
    secrets_client: Any | None = None,
    configure_logging: bool = True,
) -> Flask:
    """Build the app: settings, logging, database, rotation runtime, routes."""
    settings = config if config is not None else load_settings()
    if configure_logging:
        logs.configure(settings.log_level, settings.log_format)
    else:
        logs.route_to_stdlib()
    app = Flask(__name__)
    app.config.update(
        COMMNG_SETTINGS=settings,
        MAX_CONTENT_LENGTH=64 * 1024,
        # Flask-SQLAlchemy needs a URL at init; runtime.init_app replaces its engine with
        # one built by EngineFactory, which gets the password at connect time.
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg2://",
    )
    db.init_app(app)
    migrate.init_app(app, db, directory=_migrations_dir())
    runtime.init_app(app, settings, secrets_client=secrets_client)
    history.init_app(app)
    observability.init_app(app)
    errors.init_app(app)
    health.init_app(app)
    api.init_app(app)
    bench_routes.init_app(app)
    admin.init_app(app)
    cli.init_app(app)
    return app


def _migrations_dir() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / "migrations")
