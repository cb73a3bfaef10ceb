"""The local IAM-checking endpoint: RDS's token checks, then a relayed session on a real PostgreSQL.

Tokens come from boto3's own ``generate_db_auth_token`` with the stack's dummy credentials;
psycopg2 connects with ``sslmode=verify-full``. libpq does not hand a refused login's
SQLSTATE to psycopg2 (``pgcode`` is None at connect), so the SQLSTATE checks log in with
pg8000, which reports the server's ErrorResponse fields. Ageing a token moves the
endpoint's clock: nothing sleeps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pg8000.native
import psycopg2
import pytest

from commng_rotation import describe_error
from commng_rotation.engines import is_transient
from devstack import PostgresCluster, free_port
from devstack.iam_endpoint import IamEndpoint
from devstack.tls import make_server_cert
from tests.helpers import Database, assert_no_secrets, drop_database, new_database, wait_for

REGION = "us-east-1"
ACCESS_KEY, SECRET_KEY = "testing", "testing"  # the stack's dummy credentials (tests/conftest.py)
LIFETIME_S = 60.0  # shorter than RDS's 15 minutes, as the service's load test will use
SKEW_S = 60.0


@dataclass
class Clock:
    """The endpoint's wall clock, shifted by ``offset`` seconds."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Stack:
    endpoint: IamEndpoint
    clock: Clock
    ca: Path
    app: Database
    other: Database
    tokens: list[str]

    def token(self, user: str | None = None, **overrides: Any) -> str:
        """A token from boto3 for this endpoint; ``host``, ``port``, ``region`` or a key overridden."""
        keys = (overrides.get("access_key", ACCESS_KEY), overrides.get("secret_key", SECRET_KEY))
        client = _rds_client(*keys)
        token: str = client.generate_db_auth_token(
            DBHostname=overrides.get("host", "localhost"),
            Port=overrides.get("port", self.endpoint.port),
            DBUsername=user or self.app.role,
            Region=overrides.get("region", REGION),
        )
        self.tokens.append(token)
        return token

    def connect(self, user: str, password: str, sslmode: str = "verify-full") -> Any:
        return psycopg2.connect(
            host="localhost",
            hostaddr="127.0.0.1",
            port=self.endpoint.port,
            user=user,
            password=password,
            dbname=self.app.name,
            sslmode=sslmode,
            sslrootcert=str(self.ca),
            connect_timeout=5,
        )

    def refused_sqlstate(self, user: str, password: str, tls: bool = True) -> dict[str, str]:
        """The ErrorResponse fields of a login pg8000 sees refused."""
        context: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.ca)) if tls else False
        with pytest.raises(pg8000.native.DatabaseError) as refused:
            pg8000.native.Connection(
                user,
                host="localhost",
                port=self.endpoint.port,
                password=password,
                database=self.app.name,
                ssl_context=context,
                timeout=5,
            )
        fields: dict[str, str] = refused.value.args[0]
        return fields


@functools.cache
def _rds_client(access_key: str, secret_key: str) -> Any:
    """One client per key pair: making a boto3 client costs tens of milliseconds of CPU."""
    return boto3.client(
        "rds", region_name=REGION, aws_access_key_id=access_key, aws_secret_access_key=secret_key
    )


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port nobody listens on: a connect there is refused."""
    yield free_port()


def make_endpoint(
    stack_ca_dir: Path, pg: PostgresCluster, logins: dict[str, str], clock: Clock, **mode: Any
) -> IamEndpoint:
    return IamEndpoint(
        backend=lambda: ("127.0.0.1", pg.port),
        logins=logins,
        hostname="localhost",
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        certfile=stack_ca_dir / "server.crt",
        keyfile=stack_ca_dir / "server.key",
        token_lifetime_s=LIFETIME_S,
        skew_s=SKEW_S,
        clock=clock,
        **mode,
    )


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="commng-iam-"))
    make_server_cert(base, "localhost")
    yield base
    for path in base.iterdir():
        path.unlink()
    base.rmdir()


@pytest.fixture(scope="module")
def stack(pg: PostgresCluster, tls_dir: Path) -> Iterator[Stack]:
    app, other = new_database(pg), new_database(pg)
    clock = Clock()
    endpoint = make_endpoint(tls_dir, pg, {app.role: app.password, other.role: other.password}, clock)
    endpoint.start()
    try:
        yield Stack(endpoint, clock, tls_dir / "ca.pem", app, other, [])
    finally:
        endpoint.stop()
        drop_database(app)
        drop_database(other)


@pytest.fixture(autouse=True)
def _clock_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").clock.offset = 0.0


def test_a_good_token_logs_in_over_verified_tls_and_runs_queries(stack: Stack) -> None:
    conn = stack.connect(stack.app.role, stack.token())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), %s::text", ("relayed #?%&=+",))
            assert cur.fetchone() == (stack.app.role, stack.app.name, "relayed #?%&=+")
            cur.execute("SELECT sum(i) FROM generate_series(1, 100000) AS i")  # a reply of many packets
            assert cur.fetchone() == (5000050000,)
        conn.commit()
        assert conn.info.ssl_in_use
        assert conn.get_parameter_status("server_version")  # ParameterStatus got through
        assert conn.info.backend_pid > 0  # and BackendKeyData
    finally:
        conn.close()


REFUSALS = [
    ("host", {"host": "127.0.0.2"}),
    ("port", {"port": 1}),
    ("region", {"region": "eu-west-1"}),
    ("signature", {"secret_key": "not-the-stacks-secret"}),
    ("access_key", {"access_key": "AKIDNOTTHESTACKS"}),
]


@pytest.mark.parametrize(("cause", "overrides"), REFUSALS, ids=[cause for cause, _ in REFUSALS])
def test_a_token_for_another_endpoint_or_key_is_refused_as_rds_does(
    stack: Stack, cause: str, overrides: dict[str, Any]
) -> None:
    before = stack.endpoint.refusals.get(cause, 0)
    fields = stack.refused_sqlstate(stack.app.role, stack.token(**overrides))
    assert fields["C"] == "28000"
    assert fields["S"] == "FATAL"
    assert fields["M"] == f'PAM authentication failed for user "{stack.app.role}"'
    with pytest.raises(psycopg2.OperationalError, match="PAM authentication failed"):
        stack.connect(stack.app.role, stack.token(**overrides))
    assert stack.endpoint.refusals[cause] == before + 2


def test_a_token_for_another_user_is_refused(stack: Stack) -> None:
    before = stack.endpoint.refusals.get("user", 0)
    fields = stack.refused_sqlstate(stack.app.role, stack.token(stack.other.role))
    assert (fields["C"], fields["M"]) == ("28000", f'PAM authentication failed for user "{stack.app.role}"')
    # A good token for a login the stack does not know (on RDS: no rds_iam grant).
    stack.refused_sqlstate("postgres", stack.token("postgres"))
    assert stack.endpoint.refusals["user"] == before + 2


@pytest.mark.parametrize(
    ("cause", "offset"),
    [("expired", LIFETIME_S + 1), ("future", -(SKEW_S + 5))],
)
def test_an_expired_or_future_token_is_refused(stack: Stack, cause: str, offset: float) -> None:
    token = stack.token()
    before = stack.endpoint.refusals.get(cause, 0)
    stack.clock.offset = offset
    fields = stack.refused_sqlstate(stack.app.role, token)
    assert fields["C"] == "28000"
    assert stack.endpoint.refusals[cause] == before + 1


def test_a_token_within_its_lifetime_and_skew_is_accepted(stack: Stack) -> None:
    for offset in (LIFETIME_S - 5, -(SKEW_S - 5)):
        stack.clock.offset = offset
        stack.connect(stack.app.role, stack.token()).close()


def test_a_client_that_does_not_ask_for_tls_is_refused(stack: Stack) -> None:
    before = stack.endpoint.refusals.get("no_tls", 0)
    token = stack.token()
    with pytest.raises(psycopg2.OperationalError, match="no encryption"):
        stack.connect(stack.app.role, token, sslmode="disable")
    fields = stack.refused_sqlstate(stack.app.role, token, tls=False)
    assert fields["C"] == "28000"
    assert stack.endpoint.refusals["no_tls"] == before + 2


def test_an_open_session_outlives_its_token(stack: Stack) -> None:
    token = stack.token()
    conn = stack.connect(stack.app.role, token)
    try:
        stack.clock.offset = LIFETIME_S * 10
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        with pytest.raises(psycopg2.OperationalError, match="PAM authentication failed"):
            stack.connect(stack.app.role, token)  # a new login with it is refused
    finally:
        conn.close()


def test_no_token_or_password_reaches_a_log_or_an_error(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Signed before the capture starts: botocore's signer itself logs what it signs at DEBUG
    # (the service pins the botocore loggers at WARNING for that reason).
    good = stack.token()
    bad = [stack.token(**overrides) for overrides in ({"region": "eu-west-1"}, {"secret_key": "other"})]
    caplog.set_level(logging.DEBUG)  # the endpoint, and botocore's verifying side, at their most verbose
    errors = []
    stack.connect(stack.app.role, good).close()
    for token in bad:
        with pytest.raises(psycopg2.OperationalError) as refused:
            stack.connect(stack.app.role, token)
        errors.append(str(refused.value))
    assert "refused a login" in caplog.text  # the refusals were logged, by cause
    secrets = [*stack.tokens, stack.app.password, stack.other.password]
    secrets += [token.rsplit("X-Amz-Signature=", 1)[1] for token in stack.tokens]
    assert_no_secrets(caplog.text + "\n".join(errors), secrets)


def _login_through(endpoint: IamEndpoint, stack: Stack) -> Any:
    """The app's login with a good token through ``endpoint`` (not the stack's own)."""
    return psycopg2.connect(
        host="localhost",
        hostaddr="127.0.0.1",
        port=endpoint.port,
        user=stack.app.role,
        password=stack.token(port=endpoint.port),
        dbname=stack.app.name,
        sslmode="verify-full",
        sslrootcert=str(stack.ca),
        connect_timeout=5,
    )


def test_a_database_it_cannot_reach_closes_the_connection_as_a_down_instance_does(
    pg: PostgresCluster, tls_dir: Path, stack: Stack
) -> None:
    """The backend refuses (a failover's stale name): the client sees its connection end, which
    the rotation layer waits out, not a login error, which it would not."""
    with (
        silent_port() as closed,
        make_endpoint(tls_dir, pg, {stack.app.role: stack.app.password}, Clock()) as endpoint,
    ):
        endpoint._backend = lambda: ("127.0.0.1", closed)
        with pytest.raises(psycopg2.OperationalError) as refused:
            _login_through(endpoint, stack)
        assert describe_error(refused.value) == "connection closed unexpectedly"
        assert is_transient(refused.value)
        assert endpoint.refusals == {"backend": 1}


def test_a_failed_backend_login_becomes_an_error_without_the_password(
    pg: PostgresCluster, tls_dir: Path, stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong #?%&=+ password"
    with make_endpoint(tls_dir, pg, {stack.app.role: wrong}, Clock()) as endpoint:
        with pytest.raises(psycopg2.OperationalError) as refused:
            _login_through(endpoint, stack)
        assert "password authentication failed" in str(refused.value)
        assert endpoint.refusals == {"backend": 1}
    assert_no_secrets(str(refused.value) + caplog.text, [wrong, stack.app.password, *stack.tokens])


def test_many_concurrent_sessions(stack: Stack) -> None:
    def session(token: str) -> int:
        conn = stack.connect(stack.app.role, token)
        try:
            with conn.cursor() as cur:
                for _ in range(20):
                    cur.execute("SELECT pg_backend_pid()")
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    with ThreadPoolExecutor(24) as pool:
        assert len(set(pool.map(session, [stack.token() for _ in range(24)]))) == 24


def test_a_cancel_request_reaches_the_backend(stack: Stack) -> None:
    """psql (another process) cancels on SIGINT; the endpoint relays the CancelRequest.

    Not psycopg2's ``conn.cancel()``: it holds the GIL while libpq waits for the endpoint,
    which runs in this process.
    """
    env = {
        **os.environ,
        "PGHOST": "localhost",
        "PGHOSTADDR": "127.0.0.1",
        "PGPORT": str(stack.endpoint.port),
        "PGUSER": stack.app.role,
        "PGDATABASE": stack.app.name,
        "PGPASSWORD": stack.token(),
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(stack.ca),
    }
    sleeping = (
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
    )
    psql = subprocess.Popen(
        ["psql", "-X", "-c", "SELECT pg_sleep(30)"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: stack.app.cluster.execute(sleeping)[0][0] == 1, timeout_s=5)
        psql.send_signal(signal.SIGINT)
        _, stderr = psql.communicate(timeout=5)
    finally:
        psql.kill()
        psql.wait()
    assert "canceling statement due to user request" in stderr


def test_stop_ends_every_relayed_session(pg: PostgresCluster, tls_dir: Path, stack: Stack) -> None:
    endpoint = make_endpoint(tls_dir, pg, {stack.other.role: stack.other.password}, Clock())
    endpoint.start()
    endpoint.start()  # a second start does nothing
    try:
        token = stack.token(stack.other.role, port=endpoint.port)
        conn = psycopg2.connect(
            host="localhost",
            hostaddr="127.0.0.1",
            port=endpoint.port,
            user=stack.other.role,
            password=token,
            dbname=stack.other.name,
            sslmode="verify-full",
            sslrootcert=str(stack.ca),
        )
        assert stack.other.backends() == 1
    finally:
        endpoint.stop()
        endpoint.stop()
    with pytest.raises(psycopg2.OperationalError):
        conn.cursor().execute("SELECT 1")
    conn.close()
    wait_for(lambda: stack.other.backends() == 0, timeout_s=5)


@pytest.fixture(scope="module")
def password_endpoint(pg: PostgresCluster, tls_dir: Path) -> Iterator[IamEndpoint]:
    """The same endpoint in password mode: TLS, then the backend's own login relayed."""
    endpoint = make_endpoint(tls_dir, pg, {}, Clock(), check_tokens=False)
    with endpoint:
        yield endpoint


def test_password_mode_relays_postgresqls_own_scram_login(
    stack: Stack, password_endpoint: IamEndpoint
) -> None:
    before = password_endpoint.connects
    conn = psycopg2.connect(
        host="localhost",
        hostaddr="127.0.0.1",
        port=password_endpoint.port,
        user=stack.app.role,
        password=stack.app.password,
        dbname=stack.app.name,
        sslmode="verify-full",
        sslrootcert=str(stack.ca),
        # What the service sends in secret mode: libpq refuses any exchange but SCRAM, so the
        # endpoint cannot have asked for the password itself.
        require_auth="scram-sha-256",
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, sum(i) FROM generate_series(1, 100000) AS i")
            assert cur.fetchone() == (stack.app.role, 5000050000)
        assert conn.info.ssl_in_use
        assert conn.info.backend_pid > 0
    finally:
        conn.close()
    assert password_endpoint.connects == before + 1


def test_password_mode_a_wrong_password_is_refused_by_postgresql_itself(
    stack: Stack, password_endpoint: IamEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong #?%&=+ password"
    before = (password_endpoint.connects, password_endpoint.refusals.get("password", 0))
    with pytest.raises(pg8000.native.DatabaseError) as refused:
        pg8000.native.Connection(
            stack.app.role,
            host="localhost",
            port=password_endpoint.port,
            password=wrong,
            database=stack.app.name,
            ssl_context=ssl.create_default_context(cafile=str(stack.ca)),
            timeout=5,
        )
    fields: dict[str, str] = refused.value.args[0]
    # PostgreSQL's ErrorResponse, untouched: its SQLSTATE, its words, its routine name.
    assert fields["C"] == "28P01"
    assert fields["M"] == f'password authentication failed for user "{stack.app.role}"'
    assert fields["R"] == "auth_failed"
    assert password_endpoint.refusals["password"] == before[1] + 1
    assert password_endpoint.connects == before[0]
    assert_no_secrets(str(fields) + caplog.text, [wrong, stack.app.password])


def test_password_mode_takes_no_token(stack: Stack, password_endpoint: IamEndpoint) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        _login_through(password_endpoint, stack)
