"""A view that meets a dead connection runs again, unless something it sent may have committed.

A backend can disappear between the pool's checkout and a request's statements
(``pg_terminate_backend``, a rotation's cleanup, a restart, a failover, a NAT timeout).
Until a COMMIT has been sent nothing the request did is durable, so running the view
again on a fresh connection is exactly equivalent (an INSERT flushed inside
``session.commit()`` still counts as not committed).

When the connection dies after COMMIT was sent, the outcome is in doubt. Before sending
it, ``commng_rotation.xid`` notes the transaction's id; after the failure it is asked on a
fresh connection (``pg_xact_status``): ``aborted`` (the backend was gone before it read the
COMMIT) or no id at all (nothing was written) means the view runs again; ``committed``, or
no clear answer, returns the error as it is. Attempts are bounded (``MAX_ATTEMPTS``).

Since the view runs again anyway after a disconnect, its connections are checked out
without the pool's ping (``caller_retries``): one round trip fewer per request.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError

from commng_rotation import bounds
from commng_rotation.engines import caller_retries
from commng_rotation.runtime import get_runtime
from commng_rotation.xid import ATTEMPT_XIDS

__all__ = ["MAX_ATTEMPTS", "retry_on_disconnect"]

MAX_ATTEMPTS = 3
# A terminated backend aborts its transaction as it exits: an 'in progress' verdict is asked
# again for this long.
XACT_STATUS_WAIT_S = 2.0
F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("commng_rotation.retry")


def retry_on_disconnect(view: F) -> F:
    """Run ``view`` again (at most MAX_ATTEMPTS in all) after a disconnect before any commit.

    For views of an app set up with ``commng_rotation.init_app``; the view uses the app's
    ``db.session``. The whole request's database work is bounded: connection attempts
    wait out an outage for up to ``RotationSettings.outage_wait_s``, and no wait lasts
    past that budget plus one statement timeout.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        runtime = get_runtime()
        settings = runtime.settings
        budget_s = settings.outage_wait_s
        with (
            bounds.outage_wait(budget_s),
            bounds.deadline(budget_s + settings.statement_timeout_ms / 1000),
            caller_retries(),
        ):
            for attempt in range(1, MAX_ATTEMPTS + 1):
                xids: list[str | None] = []
                token = ATTEMPT_XIDS.set(xids)
                try:
                    return view(*args, **kwargs)
                except DBAPIError as exc:
                    if not exc.connection_invalidated or attempt == MAX_ATTEMPTS:
                        raise
                    runtime.db.session.rollback()
                    if not _nothing_committed(runtime.db, xids):
                        raise
                    log.warning("request_retried_after_disconnect", attempt=attempt)
                finally:
                    ATTEMPT_XIDS.reset(token)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper  # type: ignore[return-value]


def _nothing_committed(db: Any, xids: list[str | None]) -> bool:
    """True when every COMMIT this attempt sent (``xids``) wrote nothing or, PostgreSQL says, aborted."""
    for xid in xids:
        if xid is None:  # a transaction that never wrote: there was nothing to commit
            continue
        status = xact_status(db, xid)
        log.info("commit_outcome_resolved", status=status or "unknown")
        if status != "aborted":
            return False
    return True


def xact_status(db: Any, xid: str) -> str | None:
    """'committed', 'aborted' or 'in progress' for ``xid``; None if PostgreSQL cannot say now.

    Asked within the request's own bounds (``retry_on_disconnect``'s outage wait and
    deadline), on a checkout that is pinged: a COMMIT cut by a restart gets its verdict
    once the server accepts connections again, as the request's other work would. Only
    an 'in progress' answer is asked again, for up to XACT_STATUS_WAIT_S.
    """
    verdict_by: float | None = None
    while True:
        try:
            with caller_retries(False), db.engine.connect() as conn:
                status = conn.exec_driver_sql("SELECT pg_xact_status(%(xid)s::xid8)", {"xid": xid}).scalar()
        except DBAPIError:
            return None
        now = time.monotonic()
        if verdict_by is None:
            verdict_by = now + XACT_STATUS_WAIT_S
        if status != "in progress" or now >= verdict_by:
            return str(status) if status is not None else None
        time.sleep(0.02)  # bounded; yields to other greenlets under gevent
