"""A request whose connection dies before it commits is re-run; after a commit it is not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Connection

from commng.db import db, retry_on_disconnect
from commng.models import Message
from commng_rotation import CommitOutcomeUnknown, get_runtime
from commng_rotation import retry as retry_module
from commng_rotation.xid import ATTEMPT_XIDS, NotedCommit, XidConnection, XidCursor
from tests.helpers import Database, wait_for


def _kill_backend_of(database: Database, pid: int) -> None:
    database.cluster.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _record_what_is_sent(sent: list[str]) -> None:
    """From now on, the session's connection records every statement as it goes to the server.

    Below ``XidCursor`` in the method order: what is recorded is what psycopg2 sends, the
    DO block in front of a write included, and the COMMIT-time lookup as well.
    """

    class Sent(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> None:
            sent.append(str(query))
            super().execute(query, vars)

        def executemany(self, query: Any, vars_list: Any) -> None:
            sent.append(str(query))
            super().executemany(query, vars_list)

    class Recording(XidCursor, Sent):
        pass

    dbapi_connection = db.session.connection().connection.dbapi_connection
    assert isinstance(dbapi_connection, XidConnection)
    dbapi_connection.cursor_factory = Recording


def test_connection_killed_before_the_first_statement_is_replaced(app: Flask, database: Database) -> None:
    calls: list[int] = []

    @retry_on_disconnect
    def view() -> int:
        calls.append(1)
        if len(calls) == 1:
            conn = db.session.connection()  # checked out (pre-pinged), not used yet
            _kill_backend_of(database, conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() or 0)
        return int(db.session.execute(sa.text("SELECT 42")).scalar() or 0)

    with app.test_request_context():
        assert view() == 42
    assert len(calls) == 2


def test_no_retry_once_commit_was_sent(app: Flask, database: Database, client: Any) -> None:
    """The view committed, then lost its connection: never run again, and never answered as if
    nothing was done (``CommitOutcomeUnknown``, not the database error itself)."""
    channel = client.post("/api/channels", json={"name": "once"}).json["id"]
    calls: list[int] = []

    @retry_on_disconnect
    def view() -> None:
        calls.append(1)
        db.session.add(Message(channel_id=channel, body="exactly once"))
        db.session.commit()
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        _kill_backend_of(database, int(pid or 0))
        db.session.execute(sa.text("SELECT 1"))

    with app.test_request_context():
        with pytest.raises(CommitOutcomeUnknown) as raised:
            view()
        assert isinstance(raised.value.__cause__, sa.exc.DBAPIError)
        assert raised.value.__cause__.connection_invalidated
        db.session.rollback()
    assert len(calls) == 1
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


def test_insert_flushed_inside_commit_is_retried_when_commit_was_never_sent(
    app: Flask, database: Database, client: Any
) -> None:
    channel = client.post("/api/channels", json={"name": "flush"}).json["id"]
    calls: list[int] = []

    @retry_on_disconnect
    def view() -> None:
        calls.append(1)
        if len(calls) == 1:  # the backend dies inside the transaction, before the INSERT
            pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            _kill_backend_of(database, int(pid or 0))
        db.session.add(Message(channel_id=channel, body="written once"))
        db.session.commit()  # flush (INSERT) fails on the first attempt; COMMIT never sent

    with app.test_request_context():
        view()
    assert len(calls) == 2
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


def test_backend_killed_after_the_view_returned_does_not_turn_into_a_500(
    app: Flask, database: Database, client: Any
) -> None:
    """A read leaves its transaction open until teardown; the ROLLBACK there meets a dead socket."""

    @app.get("/test/read-then-lose-backend")
    def read_then_lose_backend() -> dict[str, int]:
        pid = int(db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar() or 0)
        _kill_backend_of(database, pid)
        return {"pid": pid}

    response = client.get("/test/read-then-lose-backend")
    assert response.status_code == 200, response.data
    assert client.get("/api/channels").status_code == 200  # the pool is usable afterwards
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # the dead connection was not leaked


def _post_with_its_first_commit_cut(
    app: Flask, database: Database, channel: int, body: str, after_kill: Callable[[], None] = lambda: None
) -> list[int]:
    """A retried view posts a message; its first COMMIT loses its backend before the server reads it.

    ``after_kill`` runs once the backend is gone (still before the COMMIT is sent). Returns
    one entry per attempt of the view.
    """
    calls: list[int] = []
    killed: list[int] = []

    def kill_before_commit_is_read(conn: Connection) -> None:
        if len(calls) == 1 and not killed:
            pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() or 0)
            _kill_backend_of(database, pid)
            gone = "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
            wait_for(lambda: not database.cluster.execute(gone, (pid,)))
            killed.append(pid)
            after_kill()

    @retry_on_disconnect
    def view() -> int:
        calls.append(1)
        message = Message(channel_id=channel, body=body)
        db.session.add(message)
        db.session.commit()
        return message.id

    with app.test_request_context():
        sa.event.listen(db.engine, "commit", kill_before_commit_is_read)
        try:
            view()
        finally:
            sa.event.remove(db.engine, "commit", kill_before_commit_is_read)
    assert killed
    return calls


def test_commit_lost_with_its_backend_is_retried_when_postgresql_says_it_aborted(
    app: Flask, database: Database, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend dies after COMMIT was due but before it ran: in doubt until pg_xact_status says aborted."""
    channel = client.post("/api/channels", json={"name": "doubt"}).json["id"]
    verdicts: list[str | None] = []
    settle = retry_module.settle

    def asked(engine: Any, commit: Any) -> str | None:
        verdicts.append(settle(engine, commit))
        return verdicts[-1]

    monkeypatch.setattr(retry_module, "settle", asked)
    calls = _post_with_its_first_commit_cut(app, database, channel, "exactly once, in doubt")
    assert verdicts == ["aborted"]  # the COMMIT was in doubt, and PostgreSQL settled it
    assert len(calls) == 2
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


def test_an_in_doubt_commit_is_settled_once_postgresql_accepts_connections_again(
    app: Flask, database: Database, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT's backend dies and new logins fail for longer than the verdict's own wait.

    What a restart does to a COMMIT in flight: the verdict must wait for the server like the
    request's other work (the outage wait), not give up after XACT_STATUS_WAIT_S and fail a
    request whose transaction PostgreSQL aborted.
    """
    channel = client.post("/api/channels", json={"name": "restart-doubt"}).json["id"]
    verdicts: list[str | None] = []
    refused: list[float] = []
    settle = retry_module.settle
    with app.app_context():
        dialect = db.engine.dialect
    connect = dialect.connect

    def starting_up(*args: Any, **kwargs: Any) -> Any:
        if refused and time.monotonic() < refused[0]:
            refused.append(time.monotonic())
            raise psycopg2.OperationalError("FATAL:  the database system is starting up")
        return connect(*args, **kwargs)

    def asked(engine: Any, commit: Any) -> str | None:
        verdicts.append(settle(engine, commit))
        return verdicts[-1]

    monkeypatch.setattr(dialect, "connect", starting_up)
    monkeypatch.setattr(retry_module, "settle", asked)
    calls = _post_with_its_first_commit_cut(
        app,
        database,
        channel,
        "settled after the restart",
        after_kill=lambda: refused.append(time.monotonic() + retry_module.XACT_STATUS_WAIT_S + 0.5),
    )
    assert len(refused) > 2  # logins were refused while the verdict was due
    assert verdicts == ["aborted"]
    assert len(calls) == 2
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


def test_the_commit_xid_comes_with_the_first_write_at_no_extra_round_trip(
    app: Flask, database: Database, client: Any
) -> None:
    """The id noted before COMMIT is the one that wrote the row, and no statement asked for it.

    Noted by the psycopg2 classes: the engine has no SQLAlchemy connection event at all.
    """
    channel = client.post("/api/channels", json={"name": "xid"}).json["id"]
    sent: list[str] = []

    @retry_on_disconnect
    def view() -> tuple[int, list[NotedCommit | None]]:
        _record_what_is_sent(sent)
        message = Message(channel_id=channel, body="which transaction?")
        db.session.add(message)
        db.session.commit()
        return message.id, list(ATTEMPT_XIDS.get() or [])

    with app.test_request_context():
        message_id, xids = view()
        assert db.engine._has_events is False
    assert ATTEMPT_XIDS.get() is None  # noted only inside the retried view
    assert not [s for s in sent if "xact_id_if_assigned" in s], sent
    writes = [s for s in sent if s.startswith("DO ")]
    assert len(writes) == 1, sent
    assert "INSERT INTO messages" in writes[0]
    assert len(sent) == 1, sent  # the INSERT (the SQL COMMIT is not a statement psycopg2 is given)
    assert len(xids) == 1
    assert xids[0] is not None
    xid, anchor, _ = xids[0]
    rows = database.cluster.execute(
        "SELECT xmin::text, pg_xact_status(%s::xid8) FROM messages WHERE id = %s",
        (xid, message_id),
        dbname=database.name,
    )
    assert rows == [(str(int(xid) % 2**32), "committed")]
    # The server it went to: its system identifier and timeline, read when the connection opened.
    system = database.cluster.execute("SELECT system_identifier::text FROM pg_control_system()")[0][0]
    assert anchor == f"{system}:00000001"


def test_a_commit_without_the_first_write_noted_asks_for_the_id_before_it_goes(
    app: Flask, client: Any
) -> None:
    """executemany goes out as it is: the id is asked for just before COMMIT instead."""
    channel = client.post("/api/channels", json={"name": "many"}).json["id"]
    sent: list[str] = []

    @retry_on_disconnect
    def view() -> list[NotedCommit | None]:
        _record_what_is_sent(sent)
        db.session.execute(
            sa.text("UPDATE channels SET name = :name WHERE id = :id"),
            [{"name": "many-1", "id": channel}, {"name": "many-2", "id": channel}],
        )
        db.session.commit()
        db.session.execute(sa.text("SELECT 1"))  # a transaction that wrote nothing
        db.session.commit()
        db.session.commit()  # none open: nothing is asked, nothing noted
        return list(ATTEMPT_XIDS.get() or [])

    with app.test_request_context():
        xids = view()
    assert [s for s in sent if s.startswith("UPDATE channels")], sent
    assert not [s for s in sent if s.startswith("DO ")], sent
    assert [s for s in sent if "xact_id_if_assigned" in s] == [
        "SELECT pg_current_xact_id_if_assigned()::text"
    ] * 2
    assert len(xids) == 2
    assert xids[0] is not None
    assert xids[1] is None


def test_every_engine_of_the_app_notes_commits_without_connection_events(app: Flask, client: Any) -> None:
    """The first engine and any built later (a rotation) connect with XidConnection, no events."""
    rotator = get_runtime(app).rotator()
    assert rotator.active is not None
    first = rotator.active.engine
    later = rotator.factory.build(rotator.credentials)
    try:
        for engine in (first, later.engine):
            with engine.connect() as conn:
                assert isinstance(conn.connection.dbapi_connection, XidConnection)
            assert engine._has_events is False
    finally:
        later.engine.dispose()
    assert client.post("/api/channels", json={"name": "no-events"}).status_code == 201
    with app.app_context():
        assert db.engine is first
    assert first._has_events is False
