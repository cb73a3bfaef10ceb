"""A view that meets a dead connection runs again, unless something it sent may have committed.

A backend can disappear between the pool's checkout and a request's statements
(``pg_terminate_backend``, a rotation's cleanup, a restart, a failover, a NAT timeout).
Until a COMMIT has been sent nothing the request did is durable, so running the view
again on a fresh connection is exactly equivalent (an INSERT flushed inside
``session.commit()`` still counts as not committed).

When the connection dies after COMMIT was sent, the outcome is in doubt. Before sending
it, ``commng_rotation.xid`` notes the transaction's id and its server's anchor; after the
failure PostgreSQL is asked on a fresh connection (``settle``: ``pg_xact_status``, under
a deadline and an outage wait of its own, since the request's own may be what cut the
COMMIT):

- ``committed``: the COMMIT took effect. ``PinnedSession.commit`` returns as a commit
  that succeeded, and the view goes on to answer as if the reply had not been lost (the
  objects it wrote keep their attributes, ids included);
- ``aborted``, or nothing written: the view runs again;
- anything else (no answer, a server with another anchor: a failover in between, where
  the id may name another transaction): ``CommitOutcomeUnknown``, which the host answers
  with its own "outcome unknown" error, never the "nothing was done" one.

Attempts are bounded (``MAX_ATTEMPTS``).

A write refused because the server is no writer now (SQLSTATE 25006: a Blue/Green
switchover's read-only phase, a demoted primary) is no error for the client either: every
connection of the pool that reached that server is replaced, and the view runs again after
a backoff (50 ms doubling to 250 ms) until a writer takes it or the outage budget is spent.
Reads meanwhile go on. Terminated backends (57P01-57P03) arrive as disconnects, handled above.

Since the view runs again anyway after a disconnect, its connections are checked out
without the pool's ping (``caller_retries``): one round trip fewer per request.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from commng_rotation import bounds
from commng_rotation.engines import caller_retries
from commng_rotation.errors import WRITER_ELSEWHERE
from commng_rotation.runtime import get_runtime
from commng_rotation.xid import ANCHOR_SQL, ATTEMPT_XIDS, NotedCommit

__all__ = ["MAX_ATTEMPTS", "CommitOutcomeUnknown", "retry_on_disconnect", "settle"]

MAX_ATTEMPTS = 3
# A terminated backend aborts its transaction as it exits: an 'in progress' verdict is asked
# again for this long.
XACT_STATUS_WAIT_S = 2.0
F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("commng_rotation.retry")


class CommitOutcomeUnknown(Exception):
    """A retried view lost its connection after something may have been committed.

    Running it again could write twice, and PostgreSQL could not say (down beyond the
    outage wait, or a failover in between): the client must ask again, with the same
    idempotency key where it has one. ``__cause__`` is the database error.
    """


def retry_on_disconnect(view: F) -> F:
    """Run ``view`` again (at most MAX_ATTEMPTS in all) after a disconnect before any commit.

    For views of an app set up with ``commng_rotation.init_app``; the view uses the app's
    ``db.session``. The whole request's database work is bounded: connection attempts
    wait out an outage for up to ``RotationSettings.outage_wait_s``, and no wait lasts
    past that budget plus one statement timeout. Raises ``CommitOutcomeUnknown`` when
    the connection died after something may have been committed.
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
            attempt, waits = 0, 0
            while True:
                attempt += 1
                noted: list[NotedCommit | None] = []
                token = ATTEMPT_XIDS.set(noted)
                try:
                    return view(*args, **kwargs)
                except DBAPIError as exc:
                    read_only = writer_elsewhere(exc)
                    if not (exc.connection_invalidated or read_only):
                        raise
                    # (A read-only refusal invalidated the whole pool, as a disconnect does:
                    # engines._invalidate_by_cause.)
                    runtime.db.session.rollback()
                    if not _nothing_committed(runtime.db.engine, noted):
                        raise CommitOutcomeUnknown("the connection died after a COMMIT was sent") from exc
                    if read_only:
                        waits += 1
                        if not _wait_for_the_writer(waits):
                            raise
                        attempt -= 1  # waiting for the writer is bounded by the outage budget
                    elif attempt >= MAX_ATTEMPTS:
                        raise
                    else:
                        log.warning("request_retried_after_disconnect", attempt=attempt)
                finally:
                    ATTEMPT_XIDS.reset(token)

    return wrapper  # type: ignore[return-value]


WAIT_FIRST_S = 0.05
WAIT_MAX_S = 0.25  # as engines.OUTAGE_MAX_RETRY_S: what a write may lose once a writer is back


def writer_elsewhere(exc: DBAPIError) -> bool:
    """True when ``exc`` says the server refused a write because it is no writer (now)."""
    return getattr(exc.orig, "pgcode", None) in WRITER_ELSEWHERE


def _wait_for_the_writer(waits: int) -> bool:
    """Back off before asking again (50 ms doubling to 250 ms); False once the outage budget is spent."""
    until = bounds.outage_deadline()
    left = None if until is None else until - time.monotonic()
    if left is None or left <= 0:
        return False
    delay = min(WAIT_FIRST_S * 2 ** min(waits - 1, 10), WAIT_MAX_S, left)
    log.warning("request_waiting_for_a_writable_primary", wait_ms=round(delay * 1000), waits=waits)
    time.sleep(delay)  # bounded by the outage budget; yields to other greenlets under gevent
    return True


def _nothing_committed(engine: Engine, noted: list[NotedCommit | None]) -> bool:
    """True when every COMMIT this attempt sent wrote nothing or, PostgreSQL says, aborted."""
    for commit in noted:
        if commit is None:  # a transaction that never wrote: there was nothing to commit
            continue
        if settle(engine, commit) != "aborted":
            return False
    return True


def settle(engine: Engine, commit: NotedCommit) -> str | None:
    """'committed', 'aborted' or 'in progress' for ``commit``; None when PostgreSQL cannot say.

    Asked under a deadline and an outage wait of its own (the request's may have run out:
    that can be what cut the COMMIT), on a pinged checkout: a COMMIT cut by a restart gets
    its verdict once the server accepts connections again, a slow server gets the time
    to answer. Only an 'in progress' answer is asked again, for up to XACT_STATUS_WAIT_S
    (a terminated backend, or one still waiting for its standby, ends its transaction as
    it exits). A server whose anchor differs from the one the COMMIT went to cannot say
    by the id; a writer (not in recovery) answers by the commit's witness where it has one.
    """
    settings = get_runtime().settings
    budget_s = settings.outage_wait_s
    verdict_by: float | None = None
    waits = 0
    with bounds.outage_wait(budget_s), bounds.own_deadline(budget_s + settings.statement_timeout_ms / 1000):
        while True:
            try:
                with caller_retries(False), engine.connect() as conn:
                    sql = _STATUS_SQL if commit.anchor is None else _VERDICT_SQL
                    params = {"xid": commit.xid, "anchor": commit.anchor}
                    row = (*conn.exec_driver_sql(sql, params).one(), None)[:2]
            except DBAPIError:
                status = None
                break
            status, anchor = row
            if commit.anchor is not None and anchor != commit.anchor:
                if anchor is None and commit.witness is not None:
                    # A server still in recovery (the name moved before the promotion ended):
                    # its witness means nothing until it is the writer. Wait for that.
                    waits += 1
                    if _wait_for_the_writer(waits):
                        continue
                status = _witnessed(engine, commit, anchor)
                break
            now = time.monotonic()
            if verdict_by is None:
                verdict_by = now + XACT_STATUS_WAIT_S
            if status != "in progress" or now >= verdict_by:
                break
            time.sleep(0.02)  # bounded; yields to other greenlets under gevent
    log.info("commit_outcome_resolved", status=status or "unknown")
    return None if status is None else str(status)


def _witnessed(engine: Engine, commit: NotedCommit, anchor: str | None) -> str | None:
    """Another server answered: 'committed' or 'aborted' by the witness on a writer, else None."""
    if commit.witness is None or anchor is None:  # no witness, or a standby still in recovery
        log.warning("commit_outcome_unanchored", reason="another server answered (a failover?)")
        return None
    try:
        with caller_retries(False), engine.connect() as conn:
            found = conn.exec_driver_sql(commit.witness.sql, commit.witness.params).first()
    except DBAPIError:
        return None
    status = "committed" if found is not None else "aborted"
    log.warning("commit_outcome_witnessed", reason="another server answered (a failover?)", status=status)
    return status


# The verdict and the anchor of the server that gives it, in one round trip. The anchor is
# NULL where the server refuses to say (a standby in recovery): then it differs. The status
# is asked only of a server with the COMMIT's anchor: another one may never have seen the id
# ("transaction ID ... is in the future") or may have given it to another transaction. A
# COMMIT noted without an anchor (the platform refused it) is asked for its status alone.
_STATUS_SQL = "SELECT pg_xact_status(%(xid)s::xid8)"
_VERDICT_SQL = (
    "SELECT CASE WHEN anchor = %(anchor)s THEN pg_xact_status(%(xid)s::xid8) END, anchor FROM ("  # noqa: S608
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE (" + ANCHOR_SQL.removeprefix("SELECT ") + ") END "
    "AS anchor) AS server"
)
