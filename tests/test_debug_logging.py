"""LOG_LEVEL=DEBUG is safe: a full rotation under gunicorn logs no password and no AWS token.

At DEBUG, botocore logs every request's headers (``X-Amz-Security-Token``: the session
token) and every response body (``GetSecretValue``: the password), and SQLAlchemy logs
statements with their parameters and rows. One gunicorn per log format (1 gevent
worker), with a recognisable session token in its environment, goes through a rotation
(AWSPENDING, ALTER ROLE, AWSCURRENT moves) and serves a request on the new login and a
scrape of the private /metrics; nothing secret may appear in what it printed.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import requests

from devstack import free_port, new_password, rotate_secret
from devstack.processes import GunicornServer
from tests.helpers import Database, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

SESSION_TOKEN = "FAKE-AWS-SESSION-TOKEN-" + secrets.token_hex(24)
ADMIN_TOKEN = "debug-admin-" + secrets.token_hex(16)
METRICS_TOKEN = "debug-metrics-" + secrets.token_hex(16)


def _adopted(server: GunicornServer, version: str) -> bool:
    """The worker logged a successful refresh to ``version`` (either format: one line each)."""
    return any("refresh_succeeded" in line and version in line for line in server.output().splitlines())


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_rotation_at_debug_logs_no_password_and_no_session_token(
    log_format: str, database: Database, moto_endpoint: str, workdir: Path
) -> None:
    client, arn, env = database.watched_env(
        moto_endpoint,
        workdir,
        LOG_LEVEL="DEBUG",
        LOG_FORMAT=log_format,
        AWS_SESSION_TOKEN=SESSION_TOKEN,
        ADMIN_TOKEN=ADMIN_TOKEN,
        METRICS_TOKEN=METRICS_TOKEN,
    )
    server = GunicornServer(env, free_port(), 1, workdir / "gunicorn.log")
    passwords = [database.password]
    server.start()
    # Connection: close: a kept-alive connection would hold the worker's graceful stop.
    with requests.Session() as http:
        http.headers["Connection"] = "close"
        try:
            created = http.post(f"{server.url}/api/channels", json={"name": "debug"}, timeout=10)
            assert created.status_code == 201
            new = new_password()
            passwords.append(new)
            version = rotate_secret(client, arn, database.cluster, database.role, new, 1.0)
            wait_for(lambda: _adopted(server, version), timeout_s=20)
            listed = http.get(f"{server.url}/api/channels", timeout=10)
            assert listed.status_code == 200
            assert [c["name"] for c in listed.json()["channels"]] == ["debug"]
            bearer = {"Authorization": f"Bearer {METRICS_TOKEN}"}
            assert http.get(f"{server.url}/metrics", headers=bearer, timeout=10).status_code == 200
        finally:
            code = server.stop()
    assert code == 0
    output = server.output()
    # DEBUG took effect: the watcher's per-check debug event is there.
    assert "secret_checked" in output
    assert ('"level": "debug"' if log_format == "json" else "[debug") in output
    assert_no_secrets(output, [*passwords, SESSION_TOKEN, ADMIN_TOKEN, METRICS_TOKEN])
