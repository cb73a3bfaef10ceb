"""gunicorn entry for the cost table: the product's app with some per-request features removed.

``BENCH_WITHOUT`` is a comma-separated list of the features to take out of the app that
``create_app`` built (nothing here is a product setting; the product cannot be told to
run without them):

- ``access_log``: gunicorn's access line (the atoms and the structlog JSON rendering);
- ``metrics``: the request counter and histogram hooks, and the pool gauges' updates on
  every checkout and checkin;
- ``request_id``: binding, echoing and unbinding the request id;
- ``preping``: the ping of a pooled connection before it is handed out;
- ``xid``: noting the transaction id before each COMMIT (the in-doubt protection: the
  ``commng.xid`` psycopg2 classes; the engines are rebuilt with plain psycopg2 connections);
- ``retry``: the views' ``retry_on_disconnect`` wrapper (its deadlines, and ``xid`` with it);
- ``pinned``: ``PinnedSession``'s engine snapshot (Flask-SQLAlchemy's plain session);
- ``bounds``: the bounded psycopg2 wait callback (a plain cooperative one instead).
"""

from __future__ import annotations

import os
from typing import Any

from gevent import monkey

monkey.patch_all()

import sqlalchemy as sa  # noqa: E402
from flask import Flask  # noqa: E402

from bench.features import FEATURES, no_access_log  # noqa: E402
from wsgi import app  # noqa: E402  (the product's app, built by create_app)


def _drop_hooks(flask_app: Flask, *functions: Any) -> None:
    for registry in (
        flask_app.before_request_funcs,
        flask_app.after_request_funcs,
        flask_app.teardown_request_funcs,
    ):
        for key, hooks in registry.items():
            registry[key] = [f for f in hooks if f not in functions]


def _each_engine(flask_app: Flask, change: Any) -> None:
    """Apply ``change`` to every engine of the app, now and after any rotation."""
    from commng_rotation import get_runtime

    for rotator in get_runtime(flask_app).rotators.values():
        rotator.factory.build_listeners.append(change)
        if rotator.active is not None:
            change(rotator.active)


def _plain_psycopg2_connections(flask_app: Flask) -> None:
    """No ``commng.xid`` classes: engines built from now on, and a new active engine, connect plainly.

    An engine's connect arguments are fixed when it is built: each bind's active engine is
    replaced by one built without them (same credentials), as a rotation would, and closed.
    """
    from commng_rotation import get_runtime

    for rotator in get_runtime(flask_app).rotators.values():
        rotator.factory.connect_args.pop("connection_factory", None)
        old = rotator.active
        if old is None:
            continue
        fresh = rotator.factory.build(old.credentials)
        fresh.reactive = old.reactive
        rotator.install(fresh.engine)
        rotator.active = fresh
        old.engine.dispose()


def without(flask_app: Flask, features: set[str]) -> None:
    """Take ``features`` out of ``flask_app`` (see the module docstring)."""
    unknown = features - set(FEATURES)
    if unknown:
        raise SystemExit(f"BENCH_WITHOUT: unknown feature(s) {sorted(unknown)}; known: {FEATURES}")
    if "access_log" in features:
        no_access_log()
    if "metrics" in features:
        from commng.observability import metrics, pools

        _drop_hooks(flask_app, metrics._start_timer, metrics._observe_request)
        pools.POOLS._change = lambda *args: None  # type: ignore[method-assign]
        pools.POOLS._detach = lambda *args: None  # type: ignore[method-assign]
    if "request_id" in features:
        from commng.observability import request_context

        _drop_hooks(flask_app, request_context._bind, request_context._echo, request_context._unbind)
    if "preping" in features:
        from commng_rotation import engines

        def no_ping(managed: Any) -> None:
            managed.engine.pool._pre_ping = False
            for name in ("_ping_on_checkout",):
                listener = getattr(engines, name, None)
                if listener is not None and sa.event.contains(managed.engine, "checkout", listener):
                    sa.event.remove(managed.engine, "checkout", listener)

        _each_engine(flask_app, no_ping)
    if "xid" in features or "retry" in features:
        _plain_psycopg2_connections(flask_app)
    if "retry" in features:
        from commng.db import retry_on_disconnect

        wrapper_code = retry_on_disconnect(lambda: None).__code__  # every wrapper shares it
        for endpoint, view in list(flask_app.view_functions.items()):
            if getattr(view, "__code__", None) is wrapper_code:
                flask_app.view_functions[endpoint] = view.__wrapped__
    if "pinned" in features:
        from flask_sqlalchemy.session import Session

        from commng_rotation.session import PinnedSession

        def plain_init(self: Any, db: Any, **kwargs: Any) -> None:
            Session.__init__(self, db, **kwargs)

        PinnedSession.__init__ = plain_init  # type: ignore[method-assign]
        PinnedSession.get_bind = Session.get_bind  # type: ignore[method-assign]
    if "bounds" in features:
        import psycopg2.extensions

        from bench.baseline import gevent_wait_callback

        psycopg2.extensions.set_wait_callback(gevent_wait_callback)


without(app, {name.strip() for name in os.environ.get("BENCH_WITHOUT", "").split(",") if name.strip()})
