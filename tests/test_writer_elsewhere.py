"""A primary that turned read-only (a Blue/Green switchover's blue, for a moment) is not an
error for the client: a write waits for a writable primary within DB_OUTAGE_WAIT_MS, the
pool that reached the read-only server is dropped, and reads go on meanwhile. Past the
budget the answer is 503 with Retry-After, never a 500.

Real PostgreSQL: ``default_transaction_read_only`` set for the cluster and reloaded, which
makes the next transaction of every existing session read-only too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from commng.db import db
from commng.models import Message
from tests.helpers import Database, wait_for


@pytest.fixture
def read_only(database: Database) -> Iterator[Any]:
    """Turns the cluster read-only for the block; ``writable()`` turns it back (also at the end)."""
    cluster = database.cluster

    def set_read_only(on: bool) -> None:
        cluster.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        cluster.execute("SELECT pg_reload_conf()")

    set_read_only(True)
    try:
        yield lambda: set_read_only(False)
    finally:
        cluster.execute("ALTER SYSTEM RESET default_transaction_read_only")
        cluster.execute("SELECT pg_reload_conf()")


def _count(app: Flask, body: str) -> int:
    with app.app_context():
        query = sa.select(sa.func.count()).select_from(Message).where(Message.body == body)
        return int(db.session.scalar(query) or 0)


def test_a_write_waits_for_the_primary_to_take_writes_again(
    database: Database, make_app: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    app = make_app(database.settings(db_outage_wait_ms=10_000))
    client = app.test_client()
    channel = client.post("/api/channels", json={"name": "switchover"}).json["id"]
    assert client.get(f"/api/channels/{channel}/messages").status_code == 200  # a pooled connection
    cluster = database.cluster
    cluster.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    cluster.execute("SELECT pg_reload_conf()")
    answers: list[Any] = []
    try:
        thread = threading.Thread(
            target=lambda: answers.append(
                client.post(f"/api/channels/{channel}/messages", json={"body": "after the switch"})
            )
        )
        thread.start()
        wait_for(lambda: "request_waiting_for_a_writable_primary" in caplog.text)
        # Reads go on while the write waits.
        assert client.get(f"/api/channels/{channel}/messages").status_code == 200
    finally:
        cluster.execute("ALTER SYSTEM RESET default_transaction_read_only")
        cluster.execute("SELECT pg_reload_conf()")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert answers[0].status_code == 201, answers[0].json
    assert _count(app, "after the switch") == 1


def test_past_the_outage_budget_a_write_is_503_with_retry_after_and_reads_still_work(
    database: Database, make_app: Any, read_only: Any
) -> None:
    app = make_app(database.settings(db_outage_wait_ms=800))
    client = app.test_client()
    response = client.post("/api/channels", json={"name": "never"})
    assert response.status_code == 503
    assert response.json["error"]["code"] == "database_unavailable"
    assert response.headers["Retry-After"] == "1"
    assert client.get("/api/channels").status_code == 200
