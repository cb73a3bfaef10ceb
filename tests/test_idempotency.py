"""``Idempotency-Key``: a POST sent again with the same key writes nothing twice.

Real PostgreSQL; the concurrent case runs against gunicorn with two gevent workers, the
others through the Flask test client. Hypothesis covers the header: any value gets a
4xx or a correct replay, never a 500.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commng import idempotency
from commng.db import db
from commng.models import Message
from commng_rotation import retry as retry_module
from devstack import free_port
from devstack.processes import GunicornServer
from tests.helpers import Database, wait_for
from tests.test_commit_outcome import IN_SYNC_WAIT, standby_never_answers  # noqa: F401 - a fixture


@pytest.fixture
def channel(client: Any) -> int:
    created: int = client.post("/api/channels", json={"name": "keyed"}).json["id"]
    return created


def _post(client: Any, channel: int, body: str, key: str | None) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post(f"/api/channels/{channel}/messages", json={"body": body}, headers=headers)


def _messages(app: Flask, body: str | None = None) -> int:
    with app.app_context():
        query = sa.select(sa.func.count()).select_from(Message)
        if body is not None:
            query = query.where(Message.body == body)
        return int(db.session.scalar(query) or 0)


def test_a_repeat_gets_the_first_answer_and_writes_nothing(app: Flask, client: Any, channel: int) -> None:
    first = _post(client, channel, "once", "key-1")
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    again = _post(client, channel, "once", "key-1")
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first.json
    assert _messages(app, "once") == 1
    quoted = _post(client, channel, "once", '"key-1"')  # the same key as a structured-field string
    assert quoted.json == first.json
    assert _messages(app, "once") == 1


def test_a_key_new_or_absent_behaves_as_without_keys(app: Flask, client: Any, channel: int) -> None:
    assert _post(client, channel, "twice", None).status_code == 201
    assert _post(client, channel, "twice", None).status_code == 201
    assert _post(client, channel, "twice", "other-key").status_code == 201
    assert _messages(app, "twice") == 3


def test_the_same_key_for_another_request_is_422(app: Flask, client: Any, channel: int) -> None:
    assert _post(client, channel, "first", "shared").status_code == 201
    reused = _post(client, channel, "second", "shared")
    assert reused.status_code == 422
    assert reused.json["error"]["code"] == "idempotency_key_reused"
    elsewhere = client.post("/api/channels", json={"name": "first"}, headers={"Idempotency-Key": "shared"})
    assert elsewhere.status_code == 422
    assert _messages(app) == 1


def test_channels_take_keys_too_and_a_taken_name_stays_409(app: Flask, client: Any) -> None:
    first = client.post("/api/channels", json={"name": "ops"}, headers={"Idempotency-Key": "c-1"})
    assert first.status_code == 201
    again = client.post("/api/channels", json={"name": "ops"}, headers={"Idempotency-Key": "c-1"})
    assert (again.status_code, again.json) == (201, first.json)
    taken = client.post("/api/channels", json={"name": "ops"}, headers={"Idempotency-Key": "c-2"})
    assert taken.status_code == 409
    assert taken.json["error"]["code"] == "channel_exists"


def test_a_message_to_a_missing_channel_is_404_and_keeps_no_key(app: Flask, client: Any) -> None:
    assert _post(client, 987654, "nowhere", "k-missing").status_code == 404
    with app.app_context():
        assert db.session.scalar(sa.text("SELECT count(*) FROM idempotency_keys")) == 0


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "ключ", "tab\there", '"a\\"b"', "\x7f"])
def test_a_key_that_is_not_one_is_400(client: Any, channel: int, key: str) -> None:
    response = _post(client, channel, "bad key", key)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_idempotency_key"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_any_header_value_gets_a_4xx_or_a_correct_replay(client: Any, channel: int, raw: bytes) -> None:
    value = raw.decode("latin-1").replace("\r", "").replace("\n", "").replace("\x00", "")
    first = _post(client, channel, "fuzz", value)
    assert first.status_code in (201, 400), first.json
    if first.status_code == 201:
        again = _post(client, channel, "fuzz", value)
        assert again.status_code == 201
        assert again.json["id"] == first.json["id"]
        assert again.headers["Idempotent-Replayed"] == "true"


def test_a_retry_after_commit_outcome_unknown_creates_nothing_new(
    app: Flask,
    database: Database,
    client: Any,
    channel: int,
    standby_never_answers: None,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first POST committed, but its reply was lost and the verdict came from another
    server (a failover): 503 commit_outcome_unknown. The client's retry with the same key
    gets the first message, and nothing is written twice."""
    monkeypatch.setattr(retry_module, "_VERDICT_SQL", "SELECT NULL, 'elsewhere'")
    monkeypatch.setattr(idempotency, "witness", lambda *args: None)  # no witness: unknown
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(_post(client, channel, "in doubt", "k-doubt")))
    thread.start()
    waiting: list[Any] = []
    wait_for(lambda: waiting.extend(database.cluster.execute(IN_SYNC_WAIT, (database.name,))) or waiting)
    database.cluster.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
    thread.join(timeout=60)
    assert answers[0].status_code == 503
    assert answers[0].json["error"]["code"] == "commit_outcome_unknown"
    database.cluster.execute("ALTER SYSTEM RESET synchronous_standby_names")
    database.cluster.execute("SELECT pg_reload_conf()")
    retried = _post(client, channel, "in doubt", "k-doubt")
    assert retried.status_code == 201
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert _messages(app, "in doubt") == 1


def test_expired_keys_are_pruned_and_the_others_kept(app: Flask, client: Any, channel: int) -> None:
    assert _post(client, channel, "old", "k-old").status_code == 201
    assert _post(client, channel, "new", "k-new").status_code == 201
    pruner = app.extensions[idempotency.EXTENSION]
    with app.app_context():
        db.session.execute(
            sa.text("UPDATE idempotency_keys SET created_at = now() - :age WHERE key = 'k-old'"),
            {"age": timedelta(seconds=pruner.ttl_s + 60)},
        )
        db.session.commit()
        assert pruner.prune(db.engine) == 1
        keys = db.session.scalars(sa.text("SELECT key FROM idempotency_keys")).all()
    assert keys == ["k-new"]
    # The key is gone: the same request is a new one now.
    assert _post(client, channel, "old", "k-old").headers.get("Idempotent-Replayed") is None


@pytest.mark.e2e
def test_ten_concurrent_duplicates_across_two_workers_create_one_row(
    database: Database, workdir: Path
) -> None:
    server = GunicornServer(database.env(), free_port(), 2, workdir / "gunicorn.log")
    server.start()
    try:
        channel = requests.post(f"{server.url}/api/channels", json={"name": "race"}, timeout=10).json()["id"]
        start = threading.Barrier(10)
        answers: list[requests.Response] = []

        def post() -> None:
            with requests.Session() as session:  # a connection each: both workers take some
                start.wait()
                answers.append(
                    session.post(
                        f"{server.url}/api/channels/{channel}/messages",
                        json={"body": "raced"},
                        headers={"Idempotency-Key": "k-race"},
                        timeout=30,
                    )
                )

        threads = [threading.Thread(target=post) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        server.stop()
    statuses = sorted(a.status_code for a in answers)
    assert len(answers) == 10
    assert set(statuses) <= {201, 409}, [a.text for a in answers]
    created = [a for a in answers if a.status_code == 201 and "Idempotent-Replayed" not in a.headers]
    assert len(created) == 1
    ids = {a.json()["id"] for a in answers if a.status_code == 201}
    assert ids == {created[0].json()["id"]}
    rows = database.cluster.execute(
        "SELECT count(*) FROM messages WHERE body = 'raced'", dbname=database.name
    )
    assert rows == [(1,)]


def test_a_new_key_costs_no_round_trip(app: Flask, client: Any, channel: int) -> None:
    """A keyed POST sends what an unkeyed one sends: one message before COMMIT (the key's row
    and the message's row go out together)."""
    from commng.api import post_message
    from commng_rotation import caller_retries
    from tests.test_retry import _record_what_is_sent

    app.extensions[idempotency.EXTENSION].last = time.monotonic()  # no prune on this connection now
    sent: dict[str | None, list[str]] = {}
    for key in (None, "k-cost"):
        headers = {} if key is None else {"Idempotency-Key": key}
        path = f"/api/channels/{channel}/messages"
        with app.test_request_context(path, method="POST", json={"body": "cost"}, headers=headers):
            sent[key] = []
            with caller_retries():  # no ping at checkout, as inside the view
                _record_what_is_sent(sent[key])
            _, status = post_message(channel)[:2]
            assert status == 201
    assert len(sent[None]) == 1, sent[None]
    assert len(sent["k-cost"]) == 1, sent["k-cost"]
    assert "INSERT INTO idempotency_keys" in sent["k-cost"][0]
