"""The layer as an adopter uses it: a tiny host app defined here, a real PostgreSQL, moto.

No sleep anywhere: the watcher is driven with ``check_once()``, and the reactive refresh
happens inside the request that meets the refused login.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

import commng_rotation as rotation
from commng_rotation import (
    InvalidSettings,
    PinnedSession,
    RotationEvent,
    RotationSettings,
    Trigger,
    get_runtime,
    list_events,
)

if TYPE_CHECKING:
    from conftest import Login

db = SQLAlchemy(session_options={"class_": PinnedSession})


class Note(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notes"
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.Text, nullable=False)


def create_app(settings: RotationSettings, secrets_client: Any) -> Flask:
    """The host app: a URL without a password, the pinned session, init_app, two views."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    rotation.init_app(app, db, settings, secrets_client=secrets_client, check_connection=True)

    @app.post("/notes/<text>")
    @rotation.retry_on_disconnect
    def add(text: str) -> tuple[dict[str, Any], int]:
        note = Note(text=text)
        db.session.add(note)
        db.session.flush()
        note_id = note.id  # before the commit: after it, note.id reloads on another connection
        db.session.commit()
        return {"id": note_id}, 201

    @app.get("/notes")
    @rotation.retry_on_disconnect
    def count() -> dict[str, Any]:
        with rotation.reading() as session:
            return {"count": session.scalar(sa.select(sa.func.count()).select_from(Note))}

    return app


def _settings(login: Login, secret_id: str, **overrides: Any) -> RotationSettings:
    base: dict[str, Any] = {
        "secret_id": secret_id,
        "aws_region": "us-east-1",
        "host": "127.0.0.1",
        "port": login.server.port,
        "dbname": login.dbname,
        "sslmode": "disable",
        "pool_size": 2,
        "max_overflow": 1,
        "grace_period_s": 1.0,
        "refresh_interval_s": 60.0,
        "application_name": "notes-test",
        "service": "notes",
        "fanout": False,
    }
    return RotationSettings(**{**base, **overrides})


@pytest.fixture
def secret(login: Login, secretsmanager: Any) -> str:
    """An RDS-style secret holding the test login; its ARN."""
    value = json.dumps({"username": login.role, "password": login.password})
    arn: str = secretsmanager.create_secret(Name=f"db/{login.dbname}", SecretString=value)["ARN"]
    return arn


@pytest.fixture
def app(login: Login, secret: str, secretsmanager: Any) -> Iterator[Flask]:
    """The host app on the moto secret, with its table and the layer's tables created."""
    ddl = sa.create_engine(
        sa.URL.create(
            "postgresql+psycopg2",
            username=login.role,
            password=login.password,
            host="127.0.0.1",
            port=login.server.port,
            database=login.dbname,
        )
    )
    with ddl.begin() as conn:
        db.metadata.create_all(conn)
        rotation.metadata.create_all(conn)
    ddl.dispose()
    flask_app = create_app(_settings(login, secret), secretsmanager)
    yield flask_app
    get_runtime(flask_app).stop()


def _rotate(client: Any, secret: str, login: Login, stage: str = "AWSCURRENT") -> str:
    """A new password in the secret (at ``stage``) and in the database; the new version id."""
    password = login.new_password()
    value = json.dumps({"username": login.role, "password": password})
    version: str = client.put_secret_value(SecretId=secret, SecretString=value, VersionStages=[stage])[
        "VersionId"
    ]
    login.set_password(password)
    login.terminate_backends()  # new logins only from here: the old pool's sessions are gone
    return version


def test_the_watcher_adopts_a_rotation(app: Flask, login: Login, secret: str, secretsmanager: Any) -> None:
    client = app.test_client()
    assert client.post("/notes/before").status_code == 201
    seen: list[RotationEvent] = []
    get_runtime(app).on_event(seen.append)  # the hook an adopter's metrics attach to
    version = _rotate(secretsmanager, secret, login)
    results = get_runtime(app).watcher.check_once()  # type: ignore[union-attr]
    assert [r.outcome for r in results] == ["rotated"]
    assert [(e.trigger, e.outcome, e.new_version) for e in seen] == [("poll", "rotated", version)]
    assert get_runtime(app).rotator().current.version_id == version  # type: ignore[union-attr]
    assert client.post("/notes/after").status_code == 201
    assert client.get("/notes").get_json() == {"count": 2}


def test_a_refused_login_refreshes_inside_the_request(
    app: Flask, login: Login, secret: str, secretsmanager: Any
) -> None:
    """The window of a single-user rotation: the database has the new password, AWSCURRENT the old."""
    client = app.test_client()
    assert client.post("/notes/before").status_code == 201
    version = _rotate(secretsmanager, secret, login, stage="AWSPENDING")
    assert client.get("/notes").get_json() == {"count": 1}  # no check_once: the request refreshed
    rotator = get_runtime(app).rotator()
    assert rotator.current is not None
    assert rotator.current.version_id == version
    assert rotator.trigger_counts[Trigger.AUTH_FAILURE] >= 1


def test_views_survive_every_backend_being_killed(app: Flask, login: Login) -> None:
    """retry_on_disconnect: the pool's connections all died (a failover, a restart); no 500."""
    client = app.test_client()
    assert client.post("/notes/one").status_code == 201
    for _ in range(3):
        login.terminate_backends()
        assert client.post("/notes/more").status_code == 201
        assert client.get("/notes").status_code == 200
    assert client.get("/notes").get_json() == {"count": 4}


def test_history_rows_record_each_refresh(app: Flask, login: Login, secret: str, secretsmanager: Any) -> None:
    version = _rotate(secretsmanager, secret, login)
    get_runtime(app).watcher.check_once()  # type: ignore[union-attr]
    get_runtime(app).stop()  # writes what the history writer still holds
    with app.app_context(), db.engine.connect() as conn:
        ours, _ = list_events(conn, 10, service="notes")
        others, _ = list_events(conn, 10, service="orders")
    newest = ours[0]
    assert (newest.service, newest.trigger, newest.outcome, newest.new_version) == (
        "notes",
        "poll",
        "rotated",
        version,
    )
    assert others == []


def test_no_password_reaches_the_logs(
    app: Flask,
    login: Login,
    secret: str,
    secretsmanager: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever the host did with logging (structlog's default printer, or the stdlib's handlers)."""
    first = login.password
    caplog.set_level(logging.INFO)  # botocore's DEBUG lines carry the secret: keep them off, as a host must
    _rotate(secretsmanager, secret, login, stage="AWSPENDING")
    assert app.test_client().get("/notes").status_code == 200
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "refresh_succeeded" in text  # the logs were captured at all
    leaked = [n for n, password in enumerate((first, login.password)) if password in text]
    assert not leaked, "a password appears in the captured logs"  # (never shown by pytest's diff)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"port": 70000}, "port"),
        ({"sslmode": "false"}, "sslmode"),
        ({"refresh_interval_s": 0}, "refresh_interval_s"),
    ],
)
def test_init_app_refuses_bad_settings_naming_the_field(
    login: Login, secret: str, secretsmanager: Any, overrides: dict[str, Any], field: str
) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    settings = _settings(login, secret, **overrides)
    try:
        runtime = rotation.init_app(app, db, settings, secrets_client=secretsmanager)
    except InvalidSettings as exc:
        message = str(exc)
    else:
        runtime.stop()
        pytest.fail(f"init_app accepted {overrides}")
    assert field in message
    assert "\n" not in message
    leaked = login.password in message
    assert not leaked


# Run in a process of its own: gevent must patch before anything imports socket or psycopg2.
_GEVENT_SCRIPT = """
from gevent import monkey

monkey.patch_all()

import json, os, sys, time

import gevent
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

import commng_rotation as rotation

db = SQLAlchemy(session_options={"class_": rotation.PinnedSession})
app = Flask("gevent_host")
app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
db.init_app(app)
login = json.loads(sys.stdin.read())
rotation.init_app(app, db, rotation.RotationSettings(
    username=login["user"], password=login["password"], host="127.0.0.1", port=login["port"],
    dbname=login["dbname"], sslmode="disable", pool_size=10, max_overflow=0, service="gevent_host",
), check_connection=True)


def sleep_in_postgres():
    with app.app_context(), db.engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_sleep(0.3)"))


started = time.monotonic()
gevent.joinall([gevent.spawn(sleep_in_postgres) for _ in range(10)], raise_error=True)
print(json.dumps({"elapsed_s": time.monotonic() - started}))
rotation.get_runtime(app).stop()
"""


def test_under_gevent_waits_on_postgres_do_not_block_the_worker(login: Login) -> None:
    """Ten 0.3 s queries in ten greenlets take about 0.3 s, not 3 s: the layer's wait callback yields."""
    pytest.importorskip("gevent")
    secret = json.dumps(
        {"user": login.role, "password": login.password, "port": login.server.port, "dbname": login.dbname}
    )
    done = subprocess.run(
        [sys.executable, "-c", _GEVENT_SCRIPT],
        input=secret,  # the password through stdin, never an argument or the environment
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    leaked = login.password in done.stdout + done.stderr
    assert not leaked
    assert done.returncode == 0, done.stderr[-2000:]
    elapsed = json.loads(done.stdout.strip().splitlines()[-1])["elapsed_s"]
    assert elapsed < 1.5, f"ten greenlets took {elapsed:.2f} s: psycopg2 blocked the gevent loop"
