"""The one place that touches a private attribute of Flask-SQLAlchemy (or Flask).

Flask-SQLAlchemy 3.1 keeps each app's engines in ``db._app_engines[app]``, a dict from
bind key to Engine; ``db.engines`` returns that same dict and ``db.engine`` its ``None``
entry, but there is no public way to replace an engine. Swapping one in is the whole
point of this layer, so it is done here and nowhere else, and ``check()`` refuses, at
``init_app``, a Flask-SQLAlchemy whose internals no longer look as they did in the
version this was written and tested against (``TESTED_VERSION``).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from flask import Flask
from sqlalchemy.engine import Engine

__all__ = ["TESTED_VERSION", "IncompatibleFlaskSQLAlchemy", "check", "install_engine"]

TESTED_VERSION = "3.1.1"


class IncompatibleFlaskSQLAlchemy(RuntimeError):
    """Flask-SQLAlchemy's engine map is not where this layer expects it."""


def check(db: Any, app: Flask) -> None:
    """Raise IncompatibleFlaskSQLAlchemy unless ``db`` keeps ``app``'s engines as expected."""
    engines = getattr(db, "_app_engines", None)
    try:
        mapping = engines[app] if engines is not None else None
    except (KeyError, TypeError):
        mapping = None
    with app.app_context():
        public = db.engines
    if not isinstance(mapping, dict) or mapping is not public:
        raise IncompatibleFlaskSQLAlchemy(
            f"Flask-SQLAlchemy {version('flask-sqlalchemy')} no longer keeps engines in "
            f"db._app_engines[app] (tested with {TESTED_VERSION}): the rotation layer cannot "
            f"swap engines; pin flask-sqlalchemy=={TESTED_VERSION} or update commng_rotation.compat"
        )


def install_engine(db: Any, app: Flask, bind_key: str | None, engine: Engine) -> None:
    """Make ``engine`` the one Flask-SQLAlchemy hands out for ``bind_key`` from now on."""
    db._app_engines[app][bind_key] = engine
