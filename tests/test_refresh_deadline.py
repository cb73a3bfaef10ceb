"""The reactive refresh runs under a deadline of its own; each caller waits at most its own.

A request's database work has a deadline (``commng.db.retry_on_disconnect``). The refresh
that a refused login starts serves every request of the worker, so the request that
happened to start it must neither shorten it nor be held past its own deadline by it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from commng_rotation import Trigger, bounds, get_runtime
from commng_rotation.credentials import AWSCURRENT, AWSPENDING, Credentials
from commng_rotation.rotator import Rotator
from devstack import new_password
from tests.helpers import Database

# A caller with this little time left: less than the refresh needs (see SLOW_FETCH_S).
SHORT_DEADLINE_S = 0.4
SLOW_FETCH_S = 0.8
# Generous: only proves a caller did not wait for the refresh (15 s) or a closed gate.
RETURNED_WITHIN_S = 5.0


def _in_the_window(database: Database, secretsmanager: Any, secret: str) -> str:
    """AWSPENDING holds a new password, the database wants it, AWSCURRENT is still old."""
    new = new_password()
    pending: str = secretsmanager.put_secret_value(
        SecretId=secret, SecretString=database.secret_string(new), VersionStages=[AWSPENDING]
    )["VersionId"]
    database.cluster.set_password(database.role, new)
    return pending


def _slow_fetch(r: Rotator, monkeypatch: pytest.MonkeyPatch, before: Callable[[], None]) -> None:
    fetch = r.source.fetch

    def slow(stage: str = AWSCURRENT) -> Any:
        before()
        return fetch(stage)

    monkeypatch.setattr(r.source, "fetch", slow)


def _call(
    r: Rotator, failed: Credentials, deadline_s: float, out: list[tuple[Credentials | None, float]]
) -> threading.Thread:
    """What the connect path does after a refused login, in a request with ``deadline_s`` left."""

    def run() -> None:
        started = time.monotonic()
        with bounds.deadline(deadline_s):
            fresh = r.on_auth_failure(failed)
        out.append((fresh, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_refresh_started_by_a_request_with_little_time_left_still_adopts_the_login(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = get_runtime(secret_app)
    r = runtime.rotator()
    old = r.credentials
    assert old is not None
    pending = _in_the_window(database, secretsmanager, secret)
    _slow_fetch(r, monkeypatch, lambda: time.sleep(SLOW_FETCH_S))  # the fault: a slow Secrets Manager

    before = len(runtime.events.recent(1000))

    with bounds.deadline(SHORT_DEADLINE_S):
        r.on_auth_failure(old)
    # At once, another refused login (another request, with time to spare) gets the new
    # login: it is not answered with a failure that came from the first one's deadline.
    with bounds.deadline(10):
        fresh = r.on_auth_failure(old)

    assert fresh is not None
    assert fresh != old
    assert r.current is not None
    assert r.current.version_id == pending
    after = runtime.events.recent(1000)
    events = after[: len(after) - before]
    assert [(e.trigger, e.outcome, e.error) for e in events] == [(Trigger.AUTH_FAILURE, "rotated", None)]


def test_requests_wait_for_a_refresh_no_longer_than_their_own_deadline(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader and a joiner give up at their deadlines; one with time to spare gets the login."""
    runtime = get_runtime(secret_app)
    r = runtime.rotator()
    old = r.credentials
    assert old is not None
    pending = _in_the_window(database, secretsmanager, secret)
    gate = threading.Event()  # Secrets Manager answers once the test opens it
    entered = threading.Event()

    def wait_at_the_gate() -> None:
        entered.set()
        gate.wait(30)

    _slow_fetch(r, monkeypatch, wait_at_the_gate)
    short: list[tuple[Credentials | None, float]] = []
    patient: list[tuple[Credentials | None, float]] = []
    try:
        leader = _call(r, old, SHORT_DEADLINE_S, short)
        assert entered.wait(10)
        joiner = _call(r, old, SHORT_DEADLINE_S, short)
        leader.join(RETURNED_WITHIN_S)
        joiner.join(RETURNED_WITHIN_S)
        assert not leader.is_alive(), "the request that started the refresh waited past its deadline"
        assert not joiner.is_alive(), "a request that joined the refresh waited past its deadline"
        assert [fresh for fresh, _ in short] == [None, None]
        # A request that comes after they gave up joins the refresh still running; it is
        # not answered with their timeouts as if the refresh had failed.
        late = _call(r, old, 20, patient)
    finally:
        gate.set()
    late.join(RETURNED_WITHIN_S)
    assert len(patient) == 1
    assert patient[0][0] is not None
    assert patient[0][0] != old
    assert r.current is not None
    assert r.current.version_id == pending
