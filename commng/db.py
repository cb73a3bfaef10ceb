"""Serving requests from the database: the ``db`` object, its session, and the retry.

``db`` is Flask-SQLAlchemy with the rotation layer's ``PinnedSession`` (a transaction
stays on the engine it began on, whatever a swap does meanwhile). Two things make a
request survive a connection that died under it:

- **The retry.** A backend can disappear between the pool's pre-ping and the request's
  statements (pg_terminate_backend, a failover, a NAT timeout). Until a COMMIT has been
  sent, nothing the request did is durable, so running the view again on a fresh
  connection is exactly equivalent (an INSERT flushed inside ``session.commit()`` still
  counts as not committed). When the connection dies after COMMIT was sent, the outcome
  is in doubt. Just before sending it we note the transaction's id
  (``pg_current_xact_id_if_assigned()``), and after the failure we ask PostgreSQL on a
  fresh connection (``pg_xact_status``): ``aborted`` (the backend was gone before it
  read the COMMIT) or no id at all (nothing was written) means the view runs again;
  ``committed``, or no clear answer, returns the error as it is. Attempts are bounded.
- **The teardown.** A read leaves its transaction open until teardown, where closing the
  session sends ROLLBACK. If the backend went away after the view returned, that
  ROLLBACK raises, and an exception out of teardown becomes a 500 for a request whose
  response was already complete. Nothing is lost by carrying on: the server ended the
  transaction with the connection, and SQLAlchemy has invalidated the connection, which
  returns its pool slot.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from flask import Flask, g, has_app_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase

from commng_rotation import PinnedSession, bounds, describe_error, get_runtime
from commng_rotation.engines import ManagedEngine

__all__ = ["MAX_ATTEMPTS", "Base", "db", "init_app", "retry_on_disconnect"]

MAX_ATTEMPTS = 3
# A terminated backend aborts its transaction as it exits: wait this long for the verdict.
XACT_STATUS_WAIT_S = 2.0
F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("commng.db")


class Base(DeclarativeBase):
    pass


# expire_on_commit=False: a view that commits can still render what it wrote without a
# second transaction (and without a second chance to meet a dead connection).
db = SQLAlchemy(model_class=Base, session_options={"class_": PinnedSession, "expire_on_commit": False})


def init_app(app: Flask) -> None:
    """Note COMMITs on every engine the rotation layer builds; make teardown survive a dead backend."""
    for rotator in get_runtime(app).rotators.values():
        rotator.factory.build_listeners.append(_listen_for_commits)
        if rotator.active is not None:
            _listen_for_commits(rotator.active)
    # Registered after Flask-SQLAlchemy's own teardown, so it runs before it (Flask runs
    # teardowns in reverse): the session is already removed when Flask-SQLAlchemy looks.
    app.teardown_appcontext(_remove_session)


def _remove_session(_: BaseException | None) -> None:
    try:
        db.session.remove()
    except DBAPIError as err:
        log.warning("session_close_failed", error=describe_error(err))
        db.session.registry.clear()


def _listen_for_commits(managed: ManagedEngine) -> None:
    # The Core event fires when COMMIT is about to go to the server, after the ORM's flush.
    sa.event.listen(managed.engine, "commit", _commit_about_to_be_sent)


def _commit_about_to_be_sent(conn: Connection) -> None:
    """Core ``commit`` event: remember which transaction the COMMIT is for."""
    if not has_app_context() or "commng_commit_xids" not in g:
        return
    # Runs before COMMIT goes out; if this fails, the COMMIT was never sent.
    xid = conn.exec_driver_sql("SELECT pg_current_xact_id_if_assigned()::text").scalar()
    g.commng_commit_xids.append(xid)


def _xact_status(xid: str) -> str | None:
    """'committed', 'aborted' or 'in progress' for ``xid``; None if PostgreSQL cannot say now."""
    deadline = time.monotonic() + XACT_STATUS_WAIT_S
    while True:
        try:
            # Every wait of the lookup, its connect included, ends within the verdict's wait.
            with bounds.deadline(XACT_STATUS_WAIT_S), db.engine.connect() as conn:
                status = conn.exec_driver_sql("SELECT pg_xact_status(%(xid)s::xid8)", {"xid": xid}).scalar()
        except DBAPIError:
            return None
        if status != "in progress" or time.monotonic() >= deadline:
            return str(status) if status is not None else None
        time.sleep(0.02)  # bounded; yields to other greenlets under gevent


def _nothing_committed() -> bool:
    """True when every COMMIT this attempt sent wrote nothing or, PostgreSQL says, aborted."""
    for xid in g.commng_commit_xids:
        if xid is None:  # a transaction that never wrote: there was nothing to commit
            continue
        status = _xact_status(xid)
        log.info("commit_outcome_resolved", status=status or "unknown")
        if status != "aborted":
            return False
    return True


def retry_on_disconnect(view: F) -> F:
    """Run ``view`` again (at most MAX_ATTEMPTS in all) after a disconnect before any commit.

    The whole request's database work is bounded: connection attempts wait out an outage
    for up to the outage budget, and no wait lasts past that budget plus one statement
    timeout.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = get_runtime().settings
        budget_s = settings.outage_wait_s
        with bounds.outage_wait(budget_s), bounds.deadline(budget_s + settings.statement_timeout_ms / 1000):
            for attempt in range(1, MAX_ATTEMPTS + 1):
                g.commng_commit_xids = []
                try:
                    return view(*args, **kwargs)
                except DBAPIError as exc:
                    if not exc.connection_invalidated or attempt == MAX_ATTEMPTS:
                        raise
                    db.session.rollback()
                    if not _nothing_committed():
                        raise
                    log.warning("request_retried_after_disconnect", attempt=attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper  # type: ignore[return-value]
