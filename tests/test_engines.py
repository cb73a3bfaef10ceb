"""Engine construction and installation, and the one place with framework internals."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from flask import Flask

from commng.db import db
from commng_rotation import compat, engines, get_runtime
from commng_rotation.compat import install_engine
from commng_rotation.engines import EngineFactory
from tests.helpers import Database

ROOT = Path(__file__).resolve().parent.parent
# The service and the rotation layer's source.
PACKAGES = (ROOT / "commng", ROOT / "rotation" / "src" / "commng_rotation")
# Private names of Flask-SQLAlchemy and Flask that code could be tempted to reach for.
PRIVATE = re.compile(r"\._app_engines|\._teardown_session|before_request_funcs|\._db\b|\._get_current_object")


def test_flask_sqlalchemy_is_the_version_the_compat_module_was_checked_against() -> None:
    installed = version("flask-sqlalchemy")
    assert installed == compat.TESTED_VERSION, (
        f"Flask-SQLAlchemy {installed} is installed; commng_rotation/compat.py was checked "
        f"against {compat.TESTED_VERSION}: re-check db._app_engines, then update TESTED_VERSION"
    )


def test_only_the_compat_module_touches_framework_internals() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in PACKAGES
        for path in package.rglob("*.py")
        if path.name != "compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert offenders == []


def test_compat_check_refuses_an_extension_that_keeps_engines_elsewhere(app: Flask) -> None:
    class Moved:
        engines: ClassVar[dict[str | None, Any]] = {}

    with pytest.raises(compat.IncompatibleFlaskSQLAlchemy, match=re.escape(compat.TESTED_VERSION)):
        compat.check(Moved(), app)
    compat.check(db, app)  # the real one passes


def test_install_engine_changes_what_flask_sqlalchemy_hands_out(app: Flask, database: Database) -> None:
    runtime = get_runtime(app)
    replacement = runtime.rotator().factory.build(runtime.rotator().credentials)
    with app.app_context():
        before = db.engine
        install_engine(db, app, None, replacement.engine)
        assert db.engine is replacement.engine
        assert db.engines[None] is replacement.engine
        assert db.session.execute(sa.text("SELECT current_user")).scalar() == database.role
        install_engine(db, app, None, before)
    replacement.engine.dispose()


def test_every_engine_gets_the_same_options(app: Flask) -> None:
    factory: EngineFactory = get_runtime(app).rotator().factory
    first = factory.build(None).engine
    second = factory.build(None).engine
    for engine in (first, second):
        pool: Any = engine.pool
        assert pool.size() == factory.settings.pool_size
        # The ping is the checkout listener's (skipped where the caller retries), not the pool's.
        assert pool._pre_ping is False
        assert sa.event.contains(engine, "checkout", engines._ping_on_checkout)
        assert engine.hide_parameters is True
    assert factory.options() == factory.options()
    assert factory.options() is not factory.options()


def test_no_password_in_engine_urls_or_reprs(app: Flask, database: Database) -> None:
    with app.app_context():
        engine = db.engine
        rendered = engine.url.render_as_string(hide_password=False)
        assert database.password not in rendered
        assert database.password not in repr(engine)
        assert engine.url.password is None
    credentials = get_runtime(app).rotator().credentials
    assert database.password not in repr(credentials)
    assert database.password not in str(credentials)


def test_bind_parameters_are_hidden_by_sqlalchemy(client: Any, app: Flask) -> None:
    # PostgreSQL's own message may still quote a literal (psycopg2 interpolates client
    # side), which is why logs and responses carry only an error class and code.
    with app.app_context():
        with pytest.raises(sa.exc.DBAPIError) as raised:
            db.session.execute(sa.text("SELECT CAST(:v AS integer)"), {"v": "secret-value-123"})
        assert "[SQL parameters hidden due to hide_parameters=True]" in str(raised.value)
        assert "'v': 'secret-value-123'" not in str(raised.value)
        db.session.rollback()


def test_a_dead_idle_connection_is_replaced_on_checkout_where_nothing_retries(
    app: Flask, database: Database
) -> None:
    """Readiness, admin, history and the CLI do not retry: their checkout still pings."""
    with app.app_context():
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        db.session.remove()  # back to the pool, idle
        database.cluster.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert db.session.execute(sa.text("SELECT 1")).scalar() == 1  # pinged, replaced
        assert db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar() != pid
        db.session.remove()


def test_no_ping_where_the_caller_retries(app: Flask, database: Database) -> None:
    """Inside ``caller_retries`` a dead idle connection is handed out as it is: the caller's
    first statement fails as a disconnect (and ``retry_on_disconnect`` runs the view again)."""
    with app.app_context():
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        db.session.remove()
        database.cluster.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with engines.caller_retries(), pytest.raises(sa.exc.DBAPIError) as raised:
            db.session.execute(sa.text("SELECT 1"))
        assert raised.value.connection_invalidated
        db.session.remove()
        assert db.session.execute(sa.text("SELECT 1")).scalar() == 1
        db.session.remove()
