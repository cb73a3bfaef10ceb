"""`flask rotation check --url`: no token in clear past the loopback, no redirect followed.

Every server here listens on 127.0.0.1; the refused URLs use the reserved ``.invalid``
domain, which never resolves, so a refusal that failed would still reach nothing.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from commng.cli import is_loopback
from tests.helpers import Database

TOKEN = "check-url-admin-token-0123456789"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every POST with ``status`` and ``Location``; records the Authorization it got."""

    status = 200
    location = ""
    seen: list[str | None]

    def do_POST(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(self.status)
        if self.location:
            self.send_header("Location", self.location)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def _server(status: int, location: str = "") -> tuple[http.server.ThreadingHTTPServer, list[str | None]]:
    seen: list[str | None] = []
    handler = type("Handler", (_Recorder,), {"status": status, "location": location, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def servers() -> Iterator[list[http.server.ThreadingHTTPServer]]:
    started: list[http.server.ThreadingHTTPServer] = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture
def check_app(database: Database, make_app: Any) -> Flask:
    app: Flask = make_app(database.settings(admin_token=TOKEN))
    return app


def _check(app: Flask, url: str) -> Any:
    return app.test_cli_runner().invoke(args=["rotation", "check", "--url", url])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("10.0.0.5", False),
        ("169.254.169.254", False),
        ("::ffff:10.0.0.5", False),
        ("localhost.example.com", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback_resolves_no_name(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "url", ["http://commng.invalid:8000", "http://admin:pw@commng.invalid", "HTTP://commng.invalid/"]
)
def test_plain_http_outside_the_loopback_is_refused_before_any_request(check_app: Flask, url: str) -> None:
    result = _check(check_app, url)
    assert result.exit_code == 1
    assert "--url must be https:// for a host outside the loopback" in result.output
    assert TOKEN not in result.output
    assert "pw" not in result.output


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(
    check_app: Flask, servers: list[http.server.ThreadingHTTPServer]
) -> None:
    elsewhere, elsewhere_seen = _server(200)
    servers.append(elsewhere)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/admin/api/rotations/check"
    for status in (301, 302, 303, 307, 308):
        redirecting, seen = _server(status, target)
        servers.append(redirecting)
        result = _check(check_app, f"http://127.0.0.1:{redirecting.server_address[1]}")
        assert result.exit_code == 1, result.output
        assert f"answered a redirect ({status}), not followed" in result.output
        assert seen == [f"Bearer {TOKEN}"]
        assert TOKEN not in result.output
    assert elsewhere_seen == []


def test_plain_http_on_the_loopback_still_works(
    check_app: Flask, servers: list[http.server.ThreadingHTTPServer]
) -> None:
    server, seen = _server(200)
    servers.append(server)
    result = _check(check_app, f"http://localhost:{server.server_address[1]}")
    assert result.exit_code == 0, result.output
    assert seen == [f"Bearer {TOKEN}"]
