"""A COMMIT whose reply was lost is answered by what PostgreSQL did, on a real server.

- Cut after the commit record is flushed (the backend terminated while it waits for a
  synchronous standby that never answers: committed locally, no reply sent): the POST is
  answered 201 with the message, and the row exists once.
- Cut by the request's own deadline while the server is slow but healthy (triggers that
  sleep): the verdict has a deadline of its own, so it is reached, and the answer is 201.
- Answered by another server (a failover in between: another anchor): the write's own
  witness (its row) decides, 201; a view that names no witness gets 503
  ``commit_outcome_unknown`` with ``Retry-After``, a code that never means "nothing was done".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from commng import api
from commng.db import db
from commng.models import Message
from commng_rotation import retry as retry_module
from tests.helpers import Database, assert_no_secrets, wait_for

IN_SYNC_WAIT = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND datname = %s"


@pytest.fixture
def channel(client: Any) -> int:
    created: int = client.post("/api/channels", json={"name": "outcome"}).json["id"]
    return created


@pytest.fixture
def standby_never_answers(database: Database) -> Iterator[None]:
    """Every COMMIT of the cluster waits for a synchronous standby that does not exist.

    (The suite's cluster runs with synchronous_commit off, for speed: on for the test.)
    """
    cluster = database.cluster
    cluster.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    cluster.execute("ALTER SYSTEM SET synchronous_commit = on")
    cluster.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        cluster.execute("ALTER SYSTEM RESET synchronous_standby_names")
        cluster.execute("ALTER SYSTEM RESET synchronous_commit")
        cluster.execute("SELECT pg_reload_conf()")


def _post_in_background(client: Any, channel: int, body: str) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []

    def post() -> None:
        answers.append(client.post(f"/api/channels/{channel}/messages", json={"body": body}))

    thread = threading.Thread(target=post)
    thread.start()
    return thread, answers


def _cut_after_the_commit_record(database: Database, client: Any, channel: int, body: str) -> Any:
    """POST ``body``; terminate its backend once its COMMIT is flushed and waits for the standby."""
    thread, answers = _post_in_background(client, channel, body)
    waiting: list[Any] = []
    wait_for(lambda: waiting.extend(database.cluster.execute(IN_SYNC_WAIT, (database.name,))) or waiting)
    database.cluster.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
    thread.join(timeout=60)
    assert not thread.is_alive()
    return answers[0]


def _count(app: Flask, body: str) -> int:
    with app.app_context():
        query = sa.select(sa.func.count()).select_from(Message).where(Message.body == body)
        return int(db.session.scalar(query) or 0)


def test_a_commit_cut_after_its_record_was_flushed_is_answered_201(
    app: Flask, database: Database, client: Any, channel: int, standby_never_answers: None, caplog: Any
) -> None:
    response = _cut_after_the_commit_record(database, client, channel, "committed, reply lost")
    assert response.status_code == 201, response.json
    assert response.json["body"] == "committed, reply lost"
    assert response.json["channel_id"] == channel
    assert _count(app, "committed, reply lost") == 1
    with app.app_context():
        assert db.session.get(Message, response.json["id"]) is not None  # the id it answered
    assert "commit_confirmed_after_disconnect" in caplog.text
    assert_no_secrets(caplog.text, [database.password])


# The server that answers the verdict is on another timeline (a promoted standby): its
# pg_xact_status is about whatever transaction holds that id there. Only the anchor differs
# here; the write really is on the server that answers.
OTHER_SERVER = "SELECT CASE WHEN false THEN pg_xact_status(%(xid)s::xid8) END, '7000000000000000001:00000002'"


def test_a_verdict_from_another_server_is_the_writes_own_witness(
    app: Flask,
    database: Database,
    client: Any,
    channel: int,
    standby_never_answers: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The POST named its row as witness: the row is on the writer, so it committed: 201, once."""
    monkeypatch.setattr(retry_module, "_VERDICT_SQL", OTHER_SERVER)
    response = _cut_after_the_commit_record(database, client, channel, "which server?")
    assert response.status_code == 201, response.json
    assert response.json["body"] == "which server?"
    assert _count(app, "which server?") == 1
    assert "commit_outcome_witnessed" in caplog.text


def test_a_verdict_from_another_server_without_a_witness_is_unknown(
    app: Flask,
    database: Database,
    client: Any,
    channel: int,
    standby_never_answers: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A view that names no witness (as an adopter's may not): the id cannot be trusted there,
    so the outcome is unknown, never "nothing was done"."""
    monkeypatch.setattr(retry_module, "_VERDICT_SQL", OTHER_SERVER)
    monkeypatch.setattr(api, "witness", lambda *args: None)
    response = _cut_after_the_commit_record(database, client, channel, "which server?")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "commit_outcome_unknown"
    assert response.headers["Retry-After"] == "1"
    assert _count(app, "which server?") == 1  # it had committed: a retry would have written twice


def test_a_commit_cut_by_the_requests_own_deadline_on_a_slow_server_gets_a_verdict(
    database: Database, make_app: Any
) -> None:
    """Each statement is within the statement timeout, the whole request is not: the client
    gives up during COMMIT, the server finishes it. The verdict is asked under its own bounds."""
    app = make_app(database.settings(postgres_statement_timeout_ms=1500, db_outage_wait_ms=0))
    client = app.test_client()
    channel = client.post("/api/channels", json={"name": "slow"}).json["id"]
    database.cluster.execute(
        """
        CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.6); RETURN NEW; END $$;
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1.2); RETURN NULL; END $$;
        CREATE TRIGGER slow_write BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION slow_write();
        CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON messages DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION slow_commit();
        """,
        dbname=database.name,
    )
    response = client.post(f"/api/channels/{channel}/messages", json={"body": "slow but sure"})
    assert response.status_code == 201, response.json
    assert _count(app, "slow but sure") == 1
