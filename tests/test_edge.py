"""The edge in the app (commng.edge): raw-path prefixes, ADMIN_ALLOWED_CIDRS, TRUSTED_PROXIES.

The Flask test client sets no RAW_URI: these tests hand one in as gunicorn would. The same
paths against a real gunicorn with gevent workers are in test_devstack.py (the shared stack).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
from flask import Flask

from commng.edge import client_allowed
from config import ConfigError, load_settings
from tests.helpers import Database

TOKEN = "edge-admin-token-0123456789"
METRICS_TOKEN = "edge-metrics-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
METRICS = {"Authorization": f"Bearer {METRICS_TOKEN}"}
# What reaches the admin blueprint or /metrics while an ALB rule on /admin* or /metrics sees
# another path: the raw path as sent, and the PATH_INFO gunicorn hands over after decoding.
BYPASSES = [
    ("GET", "//admin/api/status", "//admin/api/status", ADMIN),
    ("GET", "/%61dmin/api/status", "/admin/api/status", ADMIN),
    ("POST", "//admin/api/rotations/check", "//admin/api/rotations/check", ADMIN),
    ("GET", "/%6detrics", "/metrics", METRICS),
    ("GET", "/%2Fadmin/api/status", "//admin/api/status", ADMIN),
]


def _app(database: Database, make_app: Any, **overrides: Any) -> Flask:
    settings = database.settings(admin_token=TOKEN, metrics_token=METRICS_TOKEN, **overrides)
    app: Flask = make_app(settings)
    return app


def _get(app: Flask, raw: str, *, method: str = "GET", path: str | None = None, **environ: str) -> Any:
    """A request whose raw path is ``raw`` (RAW_URI) and whose decoded path is ``path``."""
    return app.test_client().open(
        path or raw, method=method, headers=environ.pop("headers", None) or ADMIN, environ_overrides=environ
    )


@pytest.mark.parametrize(("method", "raw", "path", "headers"), BYPASSES)
def test_a_path_past_the_prefix_is_404_before_any_auth(
    method: str, raw: str, path: str, headers: dict[str, str], database: Database, make_app: Any, caplog: Any
) -> None:
    app = _app(database, make_app)
    client = app.test_client()
    with caplog.at_level(logging.INFO):
        for sent in (headers, {}):  # with the right token, and without one (no failed-login line)
            response = client.open(path, method=method, headers=sent, environ_overrides={"RAW_URI": raw})
            assert response.status_code == 404, (raw, sent)
            assert response.json["error"]["code"] == "not_found"
    assert "auth_failed" not in caplog.text
    assert TOKEN not in caplog.text
    assert METRICS_TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("raw", "path", "headers"),
    [
        ("/admin/api/status?x=1", "/admin/api/status", ADMIN),
        ("/admin/api/%73tatus", "/admin/api/status", ADMIN),  # past /admin* at the ALB too
        ("/metrics", "/metrics", METRICS),
    ],
)
def test_the_literal_prefix_still_answers(
    raw: str, path: str, headers: dict[str, str], database: Database, make_app: Any
) -> None:
    app = _app(database, make_app)
    response = app.test_client().get(path, headers=headers, environ_overrides={"RAW_URI": raw})
    assert response.status_code == 200, raw


def test_other_routes_ignore_the_raw_path(database: Database, make_app: Any) -> None:
    app = _app(database, make_app)
    response = app.test_client().get("/api/channels", environ_overrides={"RAW_URI": "//api/channels"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("forwarded", "peer", "proxies", "status"),
    [
        (None, "127.0.0.1", 1, 200),  # no header: the peer itself
        ("203.0.113.9", "10.0.0.5", 1, 200),  # the ALB's appended entry is in the list
        ("198.51.100.7", "10.0.0.5", 1, 404),
        ("203.0.113.9, 198.51.100.7", "10.0.0.5", 1, 404),  # a spoofed first entry counts for nothing
        ("198.51.100.7, 203.0.113.9", "10.0.0.5", 1, 200),
        ("203.0.113.9, 198.51.100.7", "10.0.0.5", 2, 200),  # two proxies: the second from the right
        ("203.0.113.9", "198.51.100.7", 0, 404),  # no trusted proxy: the header is ignored
        ("not-an-address", "10.0.0.5", 1, 404),
    ],
)
def test_admin_answers_only_the_allowed_client_address(
    forwarded: str | None, peer: str, proxies: int, status: int, database: Database, make_app: Any
) -> None:
    app = _app(
        database,
        make_app,
        admin_allowed_cidrs=(ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("127.0.0.0/8")),
        trusted_proxies=proxies,
    )
    headers = {**ADMIN, **({"X-Forwarded-For": forwarded} if forwarded else {})}
    response = app.test_client().get("/admin/api/status", headers=headers, environ_base={"REMOTE_ADDR": peer})
    assert response.status_code == status, (forwarded, peer, proxies)


def test_none_closes_admin_to_every_address_but_not_metrics(database: Database, make_app: Any) -> None:
    app = _app(database, make_app, admin_allowed_cidrs=())
    client = app.test_client()
    assert client.get("/admin/api/status", headers=ADMIN).status_code == 404
    assert client.get("/metrics", headers=METRICS).status_code == 200


def test_client_allowed_reads_ipv4_mapped_ipv6() -> None:
    networks = (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/64"))
    assert client_allowed("::ffff:203.0.113.9", networks)
    assert client_allowed("2001:db8::1", networks)
    assert not client_allowed("2001:db9::1", networks)
    assert not client_allowed(None, networks)


def test_the_edge_settings_are_parsed_strictly() -> None:
    base = {"POSTGRES_USER": "u"}
    cidrs = "203.0.113.0/24, 2001:db8::/64"
    settings = load_settings({**base, "ADMIN_ALLOWED_CIDRS": cidrs, "TRUSTED_PROXIES": "1"})
    assert settings.admin_allowed_cidrs == (
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
    )
    assert settings.trusted_proxies == 1
    assert load_settings({**base, "ADMIN_ALLOWED_CIDRS": "none"}).admin_allowed_cidrs == ()
    assert load_settings(base).admin_allowed_cidrs is None
    assert load_settings(base).trusted_proxies == 0
    with pytest.raises(ConfigError, match=r"^ADMIN_ALLOWED_CIDRS must be .*'10\.0\.0\.300/8'"):
        load_settings({**base, "ADMIN_ALLOWED_CIDRS": "10.0.0.0/8,10.0.0.300/8"})
    with pytest.raises(ConfigError, match=r"^TRUSTED_PROXIES must be an integer >= 0"):
        load_settings({**base, "TRUSTED_PROXIES": "-1"})
