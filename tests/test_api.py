"""The messaging API against a real PostgreSQL, including every malformed input."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg2.extensions
import pytest
import sqlalchemy as sa

from commng.db import db
from commng_rotation.xid import XidCursor


def _channel(client: Any, name: str = "ops") -> dict[str, Any]:
    response = client.post("/api/channels", json={"name": name})
    assert response.status_code == 201, response.json
    body: dict[str, Any] = response.json
    return body


def test_create_and_list_channels(client: Any) -> None:
    created = _channel(client, "alpha-1")
    assert set(created) == {"id", "name", "created_at"}
    assert created["name"] == "alpha-1"
    _channel(client, "bravo")
    listed = client.get("/api/channels")
    assert listed.status_code == 200
    assert [c["name"] for c in listed.json["channels"]] == ["alpha-1", "bravo"]
    assert listed.json["next_after_id"] is None


def test_channels_page_oldest_first_by_after_id(client: Any) -> None:
    ids = [_channel(client, f"c-{i}")["id"] for i in range(5)]
    first = client.get("/api/channels?limit=2").json
    assert [c["id"] for c in first["channels"]] == ids[:2]
    assert first["next_after_id"] == ids[1]
    second = client.get(f"/api/channels?limit=2&after_id={first['next_after_id']}").json
    assert [c["id"] for c in second["channels"]] == ids[2:4]
    third = client.get(f"/api/channels?limit=2&after_id={second['next_after_id']}").json
    assert [c["id"] for c in third["channels"]] == ids[4:]
    assert third["next_after_id"] is None
    # A page that ends exactly with the last channel says so: no empty page to fetch.
    exact = client.get(f"/api/channels?limit=3&after_id={ids[1]}").json
    assert [c["id"] for c in exact["channels"]] == ids[2:]
    assert exact["next_after_id"] is None
    assert len(client.get("/api/channels").json["channels"]) == 5  # default limit 50
    assert client.get(f"/api/channels?after_id={ids[-1]}").json == {"channels": [], "next_after_id": None}


def test_duplicate_channel_is_409(client: Any) -> None:
    _channel(client)
    response = client.post("/api/channels", json={"name": "ops"})
    assert response.status_code == 409
    assert response.json["error"]["code"] == "channel_exists"


def test_post_read_and_page_messages(client: Any) -> None:
    channel = _channel(client)
    # An empty channel (the channel is looked up only when a page comes back empty) and a
    # page before its first message are empty lists, not 404s.
    empty = client.get(f"/api/channels/{channel['id']}/messages")
    assert empty.status_code == 200
    assert empty.json == {"messages": [], "next_before_id": None}
    ids = []
    for i in range(5):
        r = client.post(f"/api/channels/{channel['id']}/messages", json={"body": f"m{i}"})
        assert r.status_code == 201
        assert set(r.json) == {"id", "channel_id", "body", "created_at"}
        ids.append(r.json["id"])
    page = client.get(f"/api/channels/{channel['id']}/messages?limit=2").json
    assert [m["id"] for m in page["messages"]] == ids[::-1][:2]
    assert page["next_before_id"] == ids[3]
    rest = client.get(f"/api/channels/{channel['id']}/messages?limit=100&before_id={ids[3]}").json
    assert [m["id"] for m in rest["messages"]] == ids[:3][::-1]
    assert rest["next_before_id"] is None
    exact = client.get(f"/api/channels/{channel['id']}/messages?limit=3&before_id={ids[3]}").json
    assert [m["id"] for m in exact["messages"]] == ids[:3][::-1]
    assert exact["next_before_id"] is None  # nothing older: no empty page to fetch
    default = client.get(f"/api/channels/{channel['id']}/messages").json
    assert len(default["messages"]) == 5
    before_first = client.get(f"/api/channels/{channel['id']}/messages?before_id={ids[0]}")
    assert before_first.status_code == 200
    assert before_first.json["messages"] == []
    one = client.get(f"/api/messages/{ids[0]}")
    assert one.status_code == 200
    assert one.json["body"] == "m0"


def test_unknown_ids_are_404(client: Any) -> None:
    # Posting checks the channel through the foreign key, in the INSERT: same answer as a lookup.
    posted = client.post("/api/channels/999/messages", json={"body": "x"})
    assert posted.status_code == 404
    assert posted.json == {"error": {"code": "not_found", "message": "channel 999 does not exist"}}
    assert client.post("/api/channels/999/messages", json={"body": ""}).status_code == 422
    listed = client.get("/api/channels/999/messages")
    assert listed.status_code == 404
    assert listed.json["error"]["code"] == "not_found"
    assert client.get(f"/api/channels/{10**30}/messages").status_code == 404
    assert client.get("/api/messages/999").status_code == 404
    huge = 10**30
    assert client.get(f"/api/messages/{huge}").status_code == 404
    assert client.post(f"/api/channels/{huge}/messages", json={"body": "x"}).status_code == 404


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "name=ops"}, 415, "unsupported_media_type"),
        ({"data": "{not json", "content_type": "application/json"}, 400, "invalid_json"),
        ({"json": ["ops"]}, 422, "invalid_body"),
        ({"json": "ops"}, 422, "invalid_body"),
        ({"json": {}}, 422, "invalid_name"),
        ({"json": {"name": 12}}, 422, "invalid_name"),
        ({"json": {"name": 10**400}}, 422, "invalid_name"),
        ({"json": {"name": None}}, 422, "invalid_name"),
        ({"json": {"name": "UPPER"}}, 422, "invalid_name"),
        ({"json": {"name": "x" * 65}}, 422, "invalid_name"),
        ({"json": {"name": ""}}, 422, "invalid_name"),
        ({"json": {"name": "ops", "admin": True}}, 422, "unknown_fields"),
        ({"data": "x" * 70000, "content_type": "application/json"}, 413, "request_entity_too_large"),
    ],
)
def test_bad_channel_requests_are_json_4xx(
    client: Any, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = client.post("/api/channels", **kwargs)
    assert response.status_code == status
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({}, "invalid_body"),
        ({"body": ""}, "invalid_body"),
        ({"body": "   "}, "invalid_body"),
        ({"body": 5}, "invalid_body"),
        ({"body": ["x"]}, "invalid_body"),
        ({"body": "x" * 4001}, "invalid_body"),
        ({"body": "x", "pinned": True}, "unknown_fields"),
    ],
)
def test_bad_message_bodies_are_422(client: Any, payload: dict[str, Any], code: str) -> None:
    channel = _channel(client)
    response = client.post(f"/api/channels/{channel['id']}/messages", json=payload)
    assert response.status_code == 422
    assert response.json["error"]["code"] == code


def test_longest_body_is_accepted(client: Any) -> None:
    channel = _channel(client)
    response = client.post(f"/api/channels/{channel['id']}/messages", json={"body": "é" * 4000})
    assert response.status_code == 201


# {cursor} is before_id for messages, after_id for channels. %C2%B2 is "²", %EF%BC%91 a fullwidth 1.
BAD_PAGING = ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit=1e3", "limit=%C2%B2"]
BAD_PAGING += ["{cursor}=0", f"{{cursor}}={10**30}", "{cursor}=%EF%BC%91", "{cursor}=+1"]


def test_bad_paging_parameters_are_400(client: Any) -> None:
    channel = _channel(client)
    for path, cursor in [
        (f"/api/channels/{channel['id']}/messages", "before_id"),
        ("/api/channels", "after_id"),
    ]:
        for query in BAD_PAGING:
            response = client.get(f"{path}?{query.format(cursor=cursor)}")
            assert response.status_code == 400, (path, query)
            assert response.json["error"]["code"] == "invalid_parameter"


def test_unknown_route_and_method_are_json(client: Any) -> None:
    assert client.get("/nope").json["error"]["code"] == "not_found"
    response = client.delete("/api/channels")
    assert response.status_code == 405
    assert response.json["error"]["code"] == "method_not_allowed"


def test_reads_open_no_transaction_and_return_their_connection_out_of_autocommit(
    app: Any, client: Any
) -> None:
    """A read route's statements run in autocommit (no BEGIN, no ROLLBACK); a write's do not."""
    channel = _channel(client, "autocommit")["id"]
    # Per statement: (route, autocommit, a transaction open after it); per checkin: autocommit.
    statements: list[tuple[str, bool, bool]] = []
    checkins: list[bool] = []
    route: list[str] = []

    class Watching(XidCursor):
        def execute(self, query: Any, vars: Any = None) -> None:
            super().execute(query, vars)
            conn = self.connection
            statements.append((route[-1], conn.autocommit, conn.status == psycopg2.extensions.STATUS_BEGIN))

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.cursor_factory = Watching

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            checkins.append(dbapi_connection.autocommit)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "checkout", on_checkout)
    sa.event.listen(engine, "checkin", on_checkin)
    try:
        for name, call in (
            ("post", lambda: client.post(f"/api/channels/{channel}/messages", json={"body": "hello"})),
            ("list", lambda: client.get(f"/api/channels/{channel}/messages")),
            ("channels", lambda: client.get("/api/channels")),
            ("post", lambda: client.post(f"/api/channels/{channel}/messages", json={"body": "again"})),
        ):
            route.append(name)
            assert call().status_code in (200, 201)
    finally:
        sa.event.remove(engine, "checkout", on_checkout)
        sa.event.remove(engine, "checkin", on_checkin)
    reads = [s for s in statements if s[0] in ("list", "channels")]
    writes = [s for s in statements if s[0] == "post"]
    assert {route for route, _, _ in reads} == {"list", "channels"}, statements
    assert all(autocommit and not open_ for _, autocommit, open_ in reads), statements
    assert writes, statements
    assert all(not autocommit for _, autocommit, _ in writes), statements
    assert checkins == [False] * 4, checkins


def test_the_app_decides_once_per_function_whether_it_is_a_coroutine(app: Any) -> None:
    def hook() -> None:
        return None

    async def coroutine() -> None:
        return None

    assert app.ensure_sync(hook) is hook
    assert app._sync_functions[hook] is hook  # kept: asked once
    assert app.ensure_sync(hook) is hook
    # A coroutine function still gets Flask's own treatment each time, and is not kept.
    with contextlib.suppress(RuntimeError):  # Flask needs asgiref for async views
        assert app.ensure_sync(coroutine) is not coroutine
    assert coroutine not in app._sync_functions
