"""A notes service that follows its database password through rotations: commng-rotation's example.

From the root of a checkout (the layer is ``./rotation``)::

    python -m venv .venv-notes
    .venv-notes/bin/pip install -r rotation/example/requirements.txt
    cd rotation/example
    DB_SECRET_ID=<a DDL login's secret> ../../.venv-notes/bin/flask --app app init-db --owner <owner role>
    DB_SECRET_ID=<the app's secret> ../../.venv-notes/bin/gunicorn -c gunicorn.conf.py app:app

It reads the same environment variables as CommNG (``DB_SECRET_ID``, ``POSTGRES_HOST``,
``POSTGRES_PORT``, ``POSTGRES_DB``, ``POSTGRES_SSL``, ...). ``make example`` does all of
the above against ``make run``'s local stack.
"""

from gevent import monkey

monkey.patch_all()  # before anything imports socket, ssl or boto3

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402
import structlog  # noqa: E402
from flask import Flask, request  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402
from psycopg2 import sql  # noqa: E402

import commng_rotation as rotation  # noqa: E402
from commng_rotation import PinnedSession, RotationSettings  # noqa: E402

SERVICE = "notes"
MAX_TEXT = 10_000
MAX_ID = 2**63 - 1  # bigint
db = SQLAlchemy(session_options={"class_": PinnedSession})  # a transaction stays on one engine


class Note(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notes"
    id = db.Column(db.BigInteger, primary_key=True)
    text = db.Column(db.Text, nullable=False)


# -- settings: the environment CommNG reads, through strict coercers ----------------------


class ConfigError(click.ClickException):
    """A variable is malformed; the message names it and never repeats a secret."""

    def show(self, file: Any = None) -> None:
        print(f"configuration error: {self.message}", file=file or sys.stderr)


# POSTGRES_SSL as CommNG maps it: true/false mean require/disable; allow and prefer are
# refused (both fall back to cleartext when TLS fails).
_SSLMODES = {"true": "require", "false": "disable"} | {
    m: m for m in ("disable", "require", "verify-ca", "verify-full")
}


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < low or (high is not None and int(text) > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an integer {bounds}, got {raw!r}")
    return int(text)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw not in {"true", "false"}:
        raise ConfigError(f"{name} must be true or false, got {env[name]!r}")
    return raw == "true"


def settings_from_env(env: Mapping[str, str]) -> RotationSettings:
    """``RotationSettings`` from CommNG's variable names (the layer reads no environment itself)."""
    raw_ssl = env.get("POSTGRES_SSL", "require")
    sslmode = _SSLMODES.get(raw_ssl.strip().lower())
    if sslmode is None:
        raise ConfigError(
            "POSTGRES_SSL must be one of disable|require|verify-ca|verify-full (or true|false), "
            f"got {raw_ssl!r}"
        )
    root_cert = env.get("POSTGRES_SSL_ROOT_CERT") or None
    if sslmode in {"verify-ca", "verify-full"} and root_cert is None:
        raise ConfigError(f"POSTGRES_SSL_ROOT_CERT must name a CA file when POSTGRES_SSL is {sslmode}")
    secret_id = env.get("DB_SECRET_ID") or None
    username = env.get("POSTGRES_USER") or None
    if secret_id is None and username is None:
        raise ConfigError("DB_SECRET_ID (or POSTGRES_USER and POSTGRES_PASSWORD) must be set")
    return RotationSettings(
        secret_id=secret_id,
        username=username,
        password=env.get("POSTGRES_PASSWORD") or None,
        # boto3 reads AWS_DEFAULT_REGION, not AWS_REGION (which ECS and CommNG set): accept both.
        aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        host=env.get("POSTGRES_HOST") or "localhost",
        port=_int(env, "POSTGRES_PORT", 5432, 1, 65535),
        dbname=env.get("POSTGRES_DB") or SERVICE,
        sslmode=sslmode,
        ssl_root_cert=root_cert,
        refresh_interval_s=_int(env, "DB_SECRET_REFRESH_INTERVAL_MS", 300_000, 1000) / 1000,
        grace_period_s=_int(env, "DB_POOL_GRACE_PERIOD_MS", 30_000, 0) / 1000,
        pool_size=_int(env, "POSTGRES_POOL_SIZE", 5, 1),
        queue_url=env.get("DB_ROTATION_QUEUE_URL") or None,  # this service's own queue
        fanout=_bool(env, "DB_ROTATION_FANOUT", True),
        application_name=SERVICE,
        service=SERVICE,  # its history, fleet rows and NOTIFY channel apart from other services'
    )


# -- logs: structlog, JSON, the worker on every line --------------------------------------


def _worker(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # Read at each line, not at import: gunicorn forks its workers after the master imported.
    event_dict.setdefault("worker", os.getpid())
    return event_dict


def configure_logging(level: str) -> None:
    """One JSON object per line, with ``worker``, for structlog's events and the stdlib's records.

    Tracebacks are rendered without local variables: a local ``password`` stays out. botocore
    and urllib3 stay at WARNING: at DEBUG they log GetSecretValue's body, the password.
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _worker,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line, newline included (print() writes the newline apart): the
        # workers share stdout, and a line must not be split by another worker's.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Flask's and the libraries' records (an unhandled exception in a view, say) the same way.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- the app --------------------------------------------------------------------------


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """The notes service: settings, logs, the database, the rotation layer, two routes."""
    env = os.environ if env is None else env
    level = env.get("LOG_LEVEL", "INFO").strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"LOG_LEVEL must be one of DEBUG|INFO|WARNING|ERROR, got {env['LOG_LEVEL']!r}")
    configure_logging(level)
    app = Flask(__name__)
    # A URL without a password: the layer replaces the engine and logs in at connect time.
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    rotation.init_app(app, db, settings_from_env(env))
    app.post("/notes")(rotation.retry_on_disconnect(add_note))
    app.get("/notes/<int:note_id>")(rotation.retry_on_disconnect(get_note))
    app.cli.add_command(init_db_command)
    return app


def _storable(text: object) -> bool:
    """Text PostgreSQL stores: no NUL (psycopg2 refuses it) and no lone surrogate (not UTF-8)."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT or "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def add_note() -> tuple[dict[str, Any], int]:
    """POST /notes {"text": ...} -> 201 {"id": ...}."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # deeply nested JSON: silent=True does not cover it
        body = None
    text = body.get("text") if isinstance(body, dict) else None
    if not _storable(text):
        return {"error": f'a JSON body {{"text": ...}}, 1 to {MAX_TEXT} characters, no NUL'}, 400
    note = Note(text=text)
    db.session.add(note)
    db.session.flush()  # the id, before the commit:
    note_id = note.id
    # after it, reading note.id would reload the expired row on another connection, and a
    # connection that dies there cannot be retried (the note is committed): a 500 for a saved note.
    db.session.commit()
    return {"id": note_id}, 201


def get_note(note_id: int) -> tuple[dict[str, Any], int]:
    """GET /notes/<id> -> 200 {"id": ..., "text": ...}, or 404."""
    if note_id > MAX_ID:  # PostgreSQL would refuse the comparison with a bigint: a 500
        return {"error": "no such note"}, 404
    with rotation.reading() as session:
        note = session.get(Note, note_id)
        if note is None:
            return {"error": "no such note"}, 404
        return {"id": note.id, "text": note.text}, 200


@click.command("init-db")
@click.option(
    "--owner", default=None, help="create the tables as this role (SET ROLE); its default privileges apply"
)
@click.option("--grant", "grantee", default=None, help="the app's login role, given rows of the tables")
def init_db_command(owner: str | None, grantee: str | None) -> None:
    """Create the notes table and the layer's tables; run it with a DDL login's secret."""
    with db.engine.begin() as conn:
        raw: Any = conn.connection.dbapi_connection

        def run(statement: sql.Composable) -> None:
            conn.exec_driver_sql(statement.as_string(raw))  # psycopg2 quotes the names

        if owner:
            run(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
        db.metadata.create_all(conn)
        rotation.metadata.create_all(conn)
        if grantee:  # without an owner's default privileges: the app may read and write, not create
            tables = sql.SQL(", ").join(sql.Identifier(t) for t in ["notes", *rotation.metadata.tables])
            role = sql.Identifier(grantee)
            run(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(tables, role))
            run(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(role))
    made_as = f" as {owner}" if owner else ""
    granted = f"; {grantee} may read and write them" if grantee else ""
    click.echo(f"tables ready{made_as}: notes, {', '.join(rotation.metadata.tables)}{granted}")


app = create_app()
