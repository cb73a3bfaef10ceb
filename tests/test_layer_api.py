"""The rotation layer's public surface: what CommNG imports, what init_app refuses, the hooks.

CommNG uses the layer as any adopter would: only names of ``commng_rotation.__all__``
(and, for a public submodule such as ``bounds``, that module's ``__all__``). ``init_app``
checks every setting with a one-line message naming the field, and can log in once before
it returns. An adopter's view wrapped in ``retry_on_disconnect`` survives a pooled
connection whose backend was killed, where the bare view fails.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

import commng_rotation as rotation
from commng_rotation import (
    ConnectionCheckFailed,
    InvalidSettings,
    ManagedEngine,
    PinnedSession,
    RotationEvent,
    RotationSettings,
    RuntimeStatus,
)
from devstack.processes import ROOT
from tests.helpers import Database, assert_no_secrets

# The host's code: everything but the tests, the bench and the layer itself.
HOST_CODE = ["commng", "config", "devstack", "wsgi.py", "gunicorn.conf.py"]


def _python_files() -> list[Path]:
    files: list[Path] = []
    for entry in HOST_CODE:
        path = ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _private_uses(path: Path) -> list[str]:
    """Imports of the layer in ``path`` that reach past its public names."""
    public = set(rotation.__all__)
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "commng_rotation"
        ):
            if node.module == "commng_rotation":
                found += [f"{alias.name}" for alias in node.names if alias.name not in public]
            else:
                submodule = node.module.split(".", 1)[1]
                exported = getattr(rotation, submodule, None)
                names = set(getattr(exported, "__all__", ())) if submodule in public else set()
                found += [f"{node.module}.{a.name}" for a in node.names if a.name not in names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("commng_rotation.")]
    return [f"{path.relative_to(ROOT)}: {name}" for name in found]


def test_commng_imports_only_public_names_of_the_layer() -> None:
    files = _python_files()
    assert len(files) > 20  # the scan sees the host's code
    private = [use for path in files for use in _private_uses(path)]
    assert private == []


def test_the_scan_finds_a_private_import(tmp_path: Path) -> None:
    """The scan above can fail: it reports each way of reaching past ``__all__``."""
    sample = ROOT / "commng" / "_scan_sample.py"
    sample.write_text(
        "from commng_rotation.engines import caller_retries\n"
        "from commng_rotation import EngineFactory, get_runtime\n"
        "from commng_rotation.bounds import deadline\n"
        "import commng_rotation.rotator\n"
    )
    try:
        found = _private_uses(sample)
    finally:
        sample.unlink()
    assert found == [
        "commng/_scan_sample.py: commng_rotation.engines.caller_retries",
        "commng/_scan_sample.py: EngineFactory",
        "commng/_scan_sample.py: commng_rotation.rotator",
    ]


# -- validation at init_app -----------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


def _host(settings: RotationSettings, **kwargs: Any) -> tuple[Flask, Any]:
    db = SQLAlchemy(model_class=_Base, session_options={"class_": PinnedSession})
    app = Flask("host")
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    rotation.init_app(app, db, settings, **kwargs)
    return app, db


def _settings(database: Database, **overrides: Any) -> RotationSettings:
    base = RotationSettings(
        host="127.0.0.1",
        port=database.cluster.port,
        dbname=database.name,
        username=database.role,
        password=database.password,
        sslmode="disable",
        pool_size=2,
        application_name="host-app",
    )
    return replace(base, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sslmode": "false"}, "RotationSettings.sslmode must be one of disable|"),
        ({"port": 0}, "RotationSettings.port must be a TCP port from 1 to 65535, got 0"),
        ({"port": "5432"}, "RotationSettings.port must be a TCP port from 1 to 65535, got '5432'"),
        ({"refresh_interval_s": -1}, "RotationSettings.refresh_interval_s must be a number of seconds"),
        (
            {"grace_period_s": float("nan")},
            "RotationSettings.grace_period_s must be a number of seconds >= 0",
        ),
        ({"pool_size": 0}, "RotationSettings.pool_size must be an integer of connections >= 1, got 0"),
        ({"statement_timeout_ms": 2.5}, "RotationSettings.statement_timeout_ms must be an integer"),
        ({"notify_channel": "a-b; drop"}, "RotationSettings.notify_channel must be a LISTEN channel name"),
        ({"service": "Orders!"}, "RotationSettings.service must be a-z, 0-9 and _"),
        ({"application_name": "9lives", "service": None}, "(set service: the one derived"),
        ({"username": None}, "RotationSettings.username must be set when secret_id is not set"),
        ({"fanout": "yes"}, "RotationSettings.fanout must be True or False, got 'yes'"),
    ],
)
def test_init_app_names_the_setting_it_refuses(
    database: Database, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSettings) as raised:
        _host(_settings(database, **overrides))
    text = str(raised.value)
    assert message in text
    assert "\n" not in text
    assert_no_secrets(text, [database.password])


def test_a_replicas_bad_setting_is_named_as_the_replicas(database: Database) -> None:
    with pytest.raises(InvalidSettings, match=r"^replica: RotationSettings.port must be a TCP port"):
        _host(_settings(database), replica=_settings(database, port=70000))


def test_a_connection_factory_must_keep_the_commit_protection(database: Database) -> None:
    import psycopg2.extensions

    with pytest.raises(InvalidSettings, match=r"must subclass commng_rotation\.xid\.XidConnection"):
        _host(_settings(database), connect_args={"connection_factory": psycopg2.extensions.connection})


def test_check_connection_gives_the_reason_and_never_the_password(database: Database) -> None:
    wrong = database.password + "#?%&=+"
    with pytest.raises(ConnectionCheckFailed) as raised:
        _host(_settings(database, password=wrong), check_connection=True)
    assert str(raised.value) == "the default bind could not log in: password authentication failed"
    assert_no_secrets(str(raised.value), [wrong, database.password])
    app, _ = _host(_settings(database), check_connection=True)
    rotation.get_runtime(app).stop()


# -- the extension points --------------------------------------------------------------------


def test_the_hooks_see_events_engines_and_a_typed_status(database: Database) -> None:
    app, _ = _host(_settings(database, service="hooks"))
    runtime = rotation.get_runtime(app)
    try:
        events: list[RotationEvent] = []
        engines: list[ManagedEngine] = []
        runtime.on_event(events.append, replay=True)
        runtime.on_engine(engines.append)
        assert [(e.trigger, e.outcome) for e in events] == []  # static login: no refresh yet
        assert engines == [runtime.rotator().active]
        status = runtime.status()
        assert set(status) == set(get_type_hints(RuntimeStatus))
        assert status["service"] == "hooks"
        assert status["binds"][0]["source"] == "static"
    finally:
        runtime.stop()


# -- an adopter's view, with and without the retry -------------------------------------------


def test_an_adopters_retried_view_survives_a_killed_backend(database: Database) -> None:
    """The backend dies between the view's checkout and its statement (what a rotation's
    cleanup, a restart or a failover does): the bare view answers 500, the retried one 200."""
    app, db = _host(_settings(database))
    runtime = rotation.get_runtime(app)
    calls: list[str] = []

    def view() -> Any:
        conn = db.session.connection()
        if len(calls) % 2 == 0:  # each request's first run: its backend is killed under it
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            database.cluster.execute("SELECT pg_terminate_backend(%s)", (pid,))
        calls.append("run")
        return {"n": conn.execute(sa.select(sa.literal(41) + 1)).scalar()}

    app.add_url_rule("/bare", "bare", view)
    app.add_url_rule("/retried", "retried", rotation.retry_on_disconnect(view))
    client = app.test_client()
    try:
        assert client.get("/retried").get_json() == {"n": 42}
        assert calls == ["run", "run"]  # the first run met the dead backend; the second served
        calls.clear()
        app.testing = False  # a 500, as gunicorn would answer it, instead of the exception
        assert client.get("/bare").status_code == 500
    finally:
        runtime.stop()
