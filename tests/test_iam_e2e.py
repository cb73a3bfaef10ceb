"""DB_AUTH=iam end to end: gunicorn with gevent workers, logging in through the IAM-checking endpoint.

The endpoint (devstack/iam_endpoint.py) accepts a token for 4 s here instead of RDS's 15
minutes, and the service reuses one for at most 1 s. Under load for twice the
token lifetime, with the app's backends terminated every 2 s (so new connections, new
logins, keep coming): no request fails, the endpoint refuses no token (so every login after
the first token expired carried a fresh one), several tokens were signed, and the service's
log holds no token, not even a piece of its signature.
In-process, a service whose tokens name another region is refused with RDS's words, retries
once with a fresh token, and /readyz says why.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import free_port
from devstack.iam_endpoint import IamEndpoint
from devstack.processes import GunicornServer, LoadGenerator
from devstack.tls import make_server_cert
from tests.helpers import Database, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

REGION = "us-east-1"
LIFETIME_S = 4.0
REUSE_S = 1


@pytest.fixture
def iam_endpoint(database: Database) -> Iterator[tuple[IamEndpoint, Path]]:
    """The endpoint in front of the suite's PostgreSQL, logging in as the test's role; (endpoint, CA)."""
    with tempfile.TemporaryDirectory(prefix="commng-iam-e2e-") as tmp:
        ca, cert, key = make_server_cert(Path(tmp), "localhost")
        endpoint = IamEndpoint(
            backend=lambda: ("127.0.0.1", database.cluster.port),
            logins={database.role: database.password},
            hostname="localhost",
            region=REGION,
            access_key="testing",
            secret_key="testing",
            certfile=cert,
            keyfile=key,
            token_lifetime_s=LIFETIME_S,
        )
        with endpoint:
            yield endpoint, ca


def _iam_env(database: Database, endpoint: IamEndpoint, ca: Path, **extra: str) -> dict[str, str]:
    return {
        **database.env(login=False),
        "DB_AUTH": "iam",
        "POSTGRES_USER": database.role,
        "POSTGRES_HOST": "localhost",
        "POSTGRES_PORT": str(endpoint.port),
        "POSTGRES_SSL": "verify-full",
        "POSTGRES_SSL_ROOT_CERT": str(ca),
        "DB_IAM_TOKEN_REUSE_S": str(REUSE_S),
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        **extra,
    }


def test_the_service_outlives_its_tokens_under_load_with_no_failed_request(
    database: Database, iam_endpoint: tuple[IamEndpoint, Path], workdir: Path
) -> None:
    endpoint, ca = iam_endpoint
    server = GunicornServer(
        _iam_env(database, endpoint, ca), free_port(), 2, workdir / "gunicorn.log", monitor_blocking=True
    )
    server.start()
    try:
        channel = _create_channel(server.url)
        load = LoadGenerator(server.url, [channel], clients=4, max_s=60)
        load.start()
        started = time.monotonic()
        terminated = 0
        try:
            # Twice the token lifetime, every backend ended every 2 s: new logins all along.
            while time.monotonic() - started < 2 * LIFETIME_S:
                time.sleep(2.0)  # the pace of the fault itself, not a wait for a condition
                terminated += database.cluster.terminate_backends(database.role, idle_only=False)
        finally:
            result = load.stop()
    finally:
        code = server.stop()
    output = server.output()
    assert code == 0
    assert len(result.samples) > 100, "the load did not run"
    assert result.failures == [], [*map(repr, result.failures[:5])]
    assert terminated > 0
    assert endpoint.refusals == {}  # no expired token, no other refusal
    signed = output.count('"iam_token_signed"')
    assert signed >= 4, signed  # each worker signed again and again, not once for its life
    assert "X-Amz-Signature" not in output
    assert "X-Amz-Credential" not in output
    assert not re.search(r"[0-9a-f]{64}", output), "something shaped like a SigV4 signature was logged"
    assert_no_secrets(output, [database.password])
    assert server.blocking_reports() == []


def _create_channel(url: str) -> int:
    import requests

    created = requests.post(f"{url}/api/channels", json={"name": "iam"}, timeout=10)
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def test_a_token_for_another_region_is_refused_retried_once_and_readyz_says_why(
    database: Database,
    iam_endpoint: tuple[IamEndpoint, Path],
    make_app: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from config import Settings

    endpoint, ca = iam_endpoint
    settings = Settings(
        db_auth="iam",
        postgres_user=database.role,
        postgres_host="localhost",
        postgres_port=endpoint.port,
        postgres_db=database.name,
        postgres_ssl="verify-full",
        postgres_ssl_root_cert=str(ca),
        aws_region="eu-west-1",  # the endpoint is us-east-1's
        db_outage_wait_ms=0,
        log_format="console",
    )
    app = make_app(settings)
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503
    wait_for(lambda: endpoint.refusals.get("region", 0) >= 2)  # the first token, then a fresh one
    assert "iam_login_refused" in caplog.text
    assert "X-Amz-Signature" not in caplog.text + ready.get_data(as_text=True)
