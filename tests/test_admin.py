"""The admin blueprint: closed by default, Bearer for the APIs, Basic for the page, no secrets."""

from __future__ import annotations

import base64
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from commng_rotation.events import RotationEvent
from commng_rotation.runtime import get_runtime
from devstack import new_password
from tests.helpers import Database, assert_no_secrets

# A token68 value (RFC 7235): what a Bearer token may carry, as secrets.token_urlsafe makes.
TOKEN = "admin-Token_0123.~+/xyz"

PAGE = ("GET", "/admin/")
STATUS = ("GET", "/admin/api/status")
ROTATIONS = ("GET", "/admin/api/rotations")
CHECK = ("POST", "/admin/api/rotations/check")
ROUTES = [PAGE, STATUS, ROTATIONS, CHECK]


def _basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin_app(database: Database, secretsmanager: Any, secret: str, make_app: Any) -> Flask:
    """An app on the moto secret, with ADMIN_TOKEN set."""
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, admin_token=TOKEN
    )
    app: Flask = make_app(settings, secrets_client=secretsmanager)
    return app


def _call(app: Flask, route: tuple[str, str], headers: dict[str, str] | None = None) -> TestResponse:
    method, path = route
    response = app.test_client().open(path, method=method, headers=headers or {})
    assert response.headers.get("Cache-Control") == "no-store", (route, response.status_code)
    assert response.headers.get("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"
    return response


def _assert_clean(response: TestResponse, *secrets: str) -> None:
    text = response.get_data(as_text=True)
    assert_no_secrets(text, secrets)
    assert not re.search(r"SCRAM-SHA-256\$|md5[0-9a-f]{32}", text), "a password hash appears"


# -- access ------------------------------------------------------------------------------


def test_every_admin_route_is_404_without_admin_token(
    database: Database, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    settings = database.settings(db_secret_id=secret, postgres_user=None, postgres_password=None)
    app = make_app(settings, secrets_client=secretsmanager)
    for route in [*ROUTES, ("GET", "/admin")]:
        for headers in [None, _bearer(TOKEN), _basic("admin", TOKEN), _bearer("")]:
            response = _call(app, route, headers)
            assert response.status_code == 404, (route, headers)
            assert response.json is not None
            assert response.json["error"]["code"] == "not_found"
            assert "WWW-Authenticate" not in response.headers


CASES = {
    # case: (headers, the routes that answer 2xx/4xx-but-authorized with them)
    "missing": (None, set()),
    "wrong_bearer": (_bearer("not-the-token"), set()),
    "wrong_basic": (_basic("admin", "not-the-token"), set()),
    "wrong_basic_user": (_basic("root", TOKEN), set()),
    "bearer_scheme_with_basic_value": ({"Authorization": f"Basic {TOKEN}"}, set()),
    "right_bearer": (_bearer(TOKEN), {STATUS, ROTATIONS, CHECK}),
    "right_basic": (_basic("admin", TOKEN), {PAGE}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_auth_matrix(case: str, admin_app: Flask, database: Database) -> None:
    headers, allowed = CASES[case]
    for route in ROUTES:
        response = _call(admin_app, route, headers)
        _assert_clean(response, database.password, TOKEN)
        if route in allowed:
            assert response.status_code == 200, (route, response.get_data(as_text=True))
            continue
        assert response.status_code == 401, route
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith("Basic " if route == PAGE else "Bearer "), challenge
        assert response.json is not None  # the page's refusal too: every 4xx is a JSON error
        assert response.json["error"]["code"] == "unauthorized"
        assert ("user 'admin'" in response.json["error"]["message"]) == (route == PAGE)


def test_post_does_not_accept_cookies_or_basic(admin_app: Flask) -> None:
    client = admin_app.test_client()
    client.set_cookie("session", TOKEN)
    assert client.post("/admin/api/rotations/check").status_code == 401
    assert client.post("/admin/api/rotations/check", headers=_basic("admin", TOKEN)).status_code == 401


# -- check now -----------------------------------------------------------------------------


def test_check_now_returns_its_outcome_is_rate_limited_and_logged(
    admin_app: Flask, database: Database, secretsmanager: Any, secret: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    new = new_password()
    database.cluster.set_password(database.role, new)
    put = secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))

    first = _call(admin_app, CHECK, _bearer(TOKEN))
    second = _call(admin_app, CHECK, _bearer(TOKEN))

    assert first.status_code == 200
    assert first.json is not None
    assert first.json["results"] == [
        {"bind": None, "result": "changed", "outcome": "rotated", "error": None, "unavailable": False}
    ]
    assert first.json["current_version"] == put["VersionId"]
    assert get_runtime(admin_app).events.recent(1)[0].trigger == "manual"
    assert second.status_code == 429
    assert second.json is not None
    assert second.json["error"]["code"] == "rate_limited"
    assert 1 <= int(second.headers["Retry-After"]) <= 5
    actions = [r for r in caplog.records if "admin_action" in r.getMessage()]
    assert len(actions) == 2
    assert all("remote_addr" in r.getMessage() for r in actions)
    assert "rotation_check" in actions[0].getMessage()
    _assert_clean(first, database.password, new, TOKEN)
    assert_no_secrets(caplog.text, [database.password, new, TOKEN])


def test_check_now_without_a_secret_is_409(database: Database, make_app: Any) -> None:
    app = make_app(database.settings(admin_token=TOKEN))
    response = _call(app, CHECK, _bearer(TOKEN))
    assert response.status_code == 409
    assert response.json is not None
    assert response.json["error"]["code"] == "no_secret"
    assert "DB_SECRET_ID" in response.json["error"]["message"]


# -- status, history and the page ----------------------------------------------------------


def test_status_shows_the_serving_worker(admin_app: Flask, secret: str, database: Database) -> None:
    response = _call(admin_app, STATUS, _bearer(TOKEN))
    status = response.json
    assert status is not None
    runtime = get_runtime(admin_app)
    assert status["secret_id"] == secret
    (bind,) = status["binds"]
    assert bind["current_version"] == runtime.rotator().current.version_id  # type: ignore[union-attr]
    assert set(bind["active_engine"]["pool"]) >= {"size", "checked_out", "overflow"}
    assert bind["active_engine"]["age_s"] >= 0
    assert status["history_writer"]["pending"] >= 0
    assert status["history_counts"] == {}
    _assert_clean(response, database.password, TOKEN)


def _record(app: Flask, n: int) -> list[RotationEvent]:
    """n events one second apart (oldest first), written to the history."""
    runtime = get_runtime(app)
    start = datetime.now(UTC) - timedelta(hours=1)
    events = [
        runtime.events.record(
            RotationEvent(
                "poll",
                "rotated",
                old_version=f"v{i}",
                new_version=f"v{i + 1}",
                occurred_at=start + timedelta(seconds=i // 2),  # pairs share a timestamp: ids break ties
            )
        )
        for i in range(n)
    ]
    assert get_runtime(app).history.flush()
    return events


def test_rotations_paginate_newest_first_without_gaps(admin_app: Flask) -> None:
    events = _record(admin_app, 13)
    expected = [e.id for e in sorted(events, key=lambda e: (e.occurred_at, e.id), reverse=True)]
    seen: list[str] = []
    cursor = ""
    for _ in range(5):
        response = _call(
            admin_app, ("GET", f"/admin/api/rotations?limit=5&before_id={cursor}"), _bearer(TOKEN)
        )
        body = response.json
        assert body is not None
        assert set(body) == {"events", "next_before_id"}
        seen += [e["id"] for e in body["events"]]
        if body["next_before_id"] is None:
            break
        cursor = body["next_before_id"]
    assert seen == expected
    for bad in ["limit=0", "limit=201", "limit=x", "before_id=zz", f"before_id={'0' * 32}"]:
        response = _call(admin_app, ("GET", f"/admin/api/rotations?{bad}"), _bearer(TOKEN))
        assert response.status_code == 400, bad


def test_page_shows_status_history_and_failures_and_paginates(
    admin_app: Flask, database: Database, secret: str
) -> None:
    events = _record(admin_app, 30)
    runtime = get_runtime(admin_app)
    failed = runtime.events.record(RotationEvent("auth_failure", "failed", error="OperationalError:28P01"))
    assert get_runtime(admin_app).history.flush()

    page = _call(admin_app, PAGE, _basic("admin", TOKEN))
    html = page.get_data(as_text=True)

    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert "script" not in html
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert secret in html
    assert runtime.rotator().current.version_id in html
    assert 'id="engines"' in html
    assert "active" in html
    rows = re.findall(r'<tr class="(\w+)" data-event-id="(\w+)">', html)
    assert len(rows) == 25
    assert rows[0] == ("failed", failed.id)
    assert "FAILED" in html
    assert "OperationalError:28P01" in html
    older = re.search(r'id="older" href="([^"]+)"', html)
    assert older is not None
    page2 = _call(admin_app, ("GET", older.group(1).replace("&amp;", "&")), _basic("admin", TOKEN))
    rows2 = re.findall(r'data-event-id="(\w+)"', page2.get_data(as_text=True))
    assert len(rows2) == 6
    assert not set(rows2) & {r[1] for r in rows}
    assert {e.id for e in events} | {failed.id} == {r[1] for r in rows} | set(rows2)
    assert 'http-equiv="refresh"' in html
    assert 'http-equiv="refresh"' not in page2.get_data(as_text=True)
    _assert_clean(page, database.password, TOKEN)
    _assert_clean(page2, database.password, TOKEN)


def test_page_still_shows_the_status_when_the_history_cannot_be_read(
    admin_app: Flask, database: Database
) -> None:
    with database.login_refused():
        page = _call(admin_app, PAGE, _basic("admin", TOKEN))
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "the history cannot be read now" in html
    assert 'id="status"' in html
    _assert_clean(page, database.password, TOKEN)
