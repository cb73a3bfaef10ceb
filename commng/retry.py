"""Re-run a request whose database connection died before anything was committed.

A backend can disappear between the pool's pre-ping and the request's statements
(pg_terminate_backend, a failover, a NAT timeout). Until a COMMIT has been sent, nothing
the request did is durable, so running the view again on a fresh connection is exactly
equivalent (an INSERT flushed inside ``session.commit()`` still counts as not committed).
Once COMMIT itself has been sent the outcome is in doubt, and the error is returned as
it is. Attempts are bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from flask import g, has_app_context
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from commng.models import db

__all__ = ["MAX_ATTEMPTS", "retry_on_disconnect"]

MAX_ATTEMPTS = 3
F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("commng.retry")


def _commit_sent(conn: Connection) -> None:
    if has_app_context():
        g.commng_commit_started = True


# The Core event fires when COMMIT is about to go to the server, after the ORM's flush.
sa.event.listen(Engine, "commit", _commit_sent)


def retry_on_disconnect(view: F) -> F:
    """Run ``view`` again (at most MAX_ATTEMPTS in all) after a disconnect before any commit."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            g.commng_commit_started = False
            try:
                return view(*args, **kwargs)
            except DBAPIError as exc:
                if not exc.connection_invalidated or g.commng_commit_started or attempt == MAX_ATTEMPTS:
                    raise
                db.session.rollback()
                log.warning("request_retried_after_disconnect", attempt=attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper  # type: ignore[return-value]
