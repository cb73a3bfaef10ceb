"""Engine construction and installation, and the one private Flask-SQLAlchemy attribute."""

from __future__ import annotations

from typing import Any

import flask_sqlalchemy
import sqlalchemy as sa
from flask import Flask

from commng.engines import EngineFactory, install_engine
from commng.models import db
from commng.runtime import get_runtime
from tests.conftest import Database


def test_flask_sqlalchemy_version_is_the_one_install_engine_was_written_for() -> None:
    # install_engine writes db._app_engines; a new Flask-SQLAlchemy must be re-checked.
    from importlib.metadata import version

    assert version("flask-sqlalchemy") == "3.1.1"
    assert hasattr(flask_sqlalchemy.SQLAlchemy(), "_app_engines")


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
        assert pool.size() == factory.settings.postgres_pool_size
        assert pool._pre_ping is True
        assert engine.hide_parameters is True
    assert factory.options() == factory.options() and factory.options() is not factory.options()


def test_no_password_in_engine_urls_or_reprs(app: Flask, database: Database) -> None:
    with app.app_context():
        engine = db.engine
        rendered = engine.url.render_as_string(hide_password=False)
        assert database.password not in rendered and database.password not in repr(engine)
        assert engine.url.password is None
    credentials = get_runtime(app).rotator().credentials
    assert database.password not in repr(credentials) and database.password not in str(credentials)


def test_bind_parameters_are_hidden_by_sqlalchemy(client: Any, app: Flask) -> None:
    # PostgreSQL's own message may still quote a literal (psycopg2 interpolates client
    # side), which is why logs and responses carry only an error class and code.
    with app.app_context():
        try:
            db.session.execute(sa.text("SELECT CAST(:v AS integer)"), {"v": "secret-value-123"})
        except sa.exc.DBAPIError as exc:
            assert "[SQL parameters hidden due to hide_parameters=True]" in str(exc)
            assert "'v': 'secret-value-123'" not in str(exc)
        else:  # pragma: no cover
            raise AssertionError("the cast should fail")
        db.session.rollback()
