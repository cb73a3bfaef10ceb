"""Start-up paths and errors as an operator meets them: bad configuration, the CLI's one-line
errors, and the reason every database failure is logged with."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest
import sqlalchemy as sa
from psycopg2 import sql

from commng_rotation import describe_error, error_code
from devstack import PostgresCluster, free_port, new_password
from tests.helpers import Database, assert_no_secrets

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env(database: Database, login: bool = True, **extra: str) -> dict[str, str]:
    return {**os.environ, **database.env(login, **extra)}


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# -- configuration: one line, exit code 2 ---------------------------------------------------

GUNICORN = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]
BAD_VARIABLES = [
    ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY must be an integer >= 1, got '0'"),
    ("PORT", "abc", "PORT must be an integer >= 1, got 'abc'"),
    ("PORT", "70000", "PORT must be a TCP port from 1 to 65535, got '70000'"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of DEBUG|INFO|WARNING|ERROR, got 'loud'"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT must be one of json|console, got 'xml'"),
    (
        "DB_SECRET_REFRESH_INTERVAL_MS",
        "abc",
        "DB_SECRET_REFRESH_INTERVAL_MS must be an integer number of milliseconds >= 1000, got 'abc'",
    ),
]


def _assert_one_config_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"configuration error: {expected}"]
    assert "Traceback" not in result.stdout + result.stderr
    assert "Booting worker" not in result.stdout + result.stderr


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VARIABLES, ids=lambda v: str(v)[:40])
def test_bad_variable_stops_gunicorn_with_one_line(
    database: Database, name: str, value: str, expected: str
) -> None:
    env = _env(database, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{free_port()}", **{name: value})
    result = _run(GUNICORN, env)
    _assert_one_config_line(result, expected)
    assert_no_secrets(result.stdout + result.stderr, [database.password])


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("WEB_CONCURRENCY", "x", "WEB_CONCURRENCY must be an integer >= 1, got 'x'"),
        ("WEB_CONCURRENCY", "-3", "WEB_CONCURRENCY must be an integer >= 1, got '-3'"),
        ("WEB_CONCURRENCY", "", None),  # empty means unset: gunicorn.conf.py's default
        ("PORT", "abc", "PORT must be an integer >= 1, got 'abc'"),
    ],
)
def test_the_image_entrypoint_checks_what_gunicorn_parses_before_its_config_file(
    database: Database, name: str, value: str, expected: str | None
) -> None:
    """gunicorn parses WEB_CONCURRENCY when it is imported: the entrypoint checks it first."""
    port = free_port()
    env = _env(database, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port}", PATH=f"{BIN}:{os.environ['PATH']}")
    env[name] = value
    if expected is not None:
        result = _run(["sh", "docker-entrypoint.sh", *GUNICORN], env)
        _assert_one_config_line(result, expected)
        return
    env["GUNICORN_CMD_ARGS"] += " --check-config"
    result = _run(["sh", "docker-entrypoint.sh", *GUNICORN], env)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.xfail(
    strict=True,
    reason="gunicorn's own config module parses WEB_CONCURRENCY at import (int(), then > 0) before "
    "gunicorn.conf.py runs; the image's entrypoint checks it first (the test above)",
)
@pytest.mark.parametrize("value", ["x", "-3"])
def test_bare_gunicorn_cannot_check_what_it_parses_itself(database: Database, value: str) -> None:
    env = _env(database, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{free_port()}", WEB_CONCURRENCY=value)
    _assert_one_config_line(_run(GUNICORN, env), f"WEB_CONCURRENCY must be an integer >= 1, got '{value}'")


# -- the CLI's one-line errors ----------------------------------------------------------------

FLASK = [str(BIN / "flask"), "--app", "wsgi", "rotation"]
TOKEN = "startup-admin-token-0123456789"


def _without_service_variables() -> dict[str, str]:
    prefixes = ("POSTGRES_", "DB_SECRET", "ADMIN_TOKEN", "PROMETHEUS_", "PORT", "LOG_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def test_the_cli_without_configuration_prints_the_config_error_line() -> None:
    result = _run([*FLASK, "status"], _without_service_variables())
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "configuration error: POSTGRES_USER (and POSTGRES_PASSWORD) must be set when DB_SECRET_ID is not set"
    ]
    assert result.stdout == ""


def test_the_cli_says_in_one_line_that_the_database_is_unreachable() -> None:
    port = free_port()  # nothing listens there
    password = new_password()
    env = {
        **_without_service_variables(),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(port),
        "POSTGRES_USER": "commng",
        "POSTGRES_PASSWORD": password,
        "POSTGRES_SSL": "false",
        "LOG_LEVEL": "WARNING",
    }
    for command in ("status", "history"):
        result = _run([*FLASK, command], env)
        assert result.returncode == 1, result.stderr[-2000:]
        assert result.stderr.splitlines() == [
            f"Error: cannot read the rotation history in 127.0.0.1:{port}/comm_ng: connection refused"
        ]
        assert "Traceback" not in result.stderr
        assert_no_secrets(result.stdout + result.stderr, [password])


def test_the_cli_check_says_in_one_line_that_the_service_is_unreachable_or_no_token_is_set(
    database: Database,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {**_without_service_variables(), **database.env(LOG_LEVEL="WARNING", ADMIN_TOKEN=TOKEN)}
    result = _run([*FLASK, "check", "--url", url], env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: the admin API at {url} is unreachable (connection refused): "
        "is the service running there? (--url)"
    ]
    del env["ADMIN_TOKEN"]
    result = _run([*FLASK, "check", "--url", url], env)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ADMIN_TOKEN is not set: the admin API needs the running service's token")
    assert_no_secrets(result.stdout + result.stderr, [database.password, TOKEN])


def test_db_upgrade_creates_the_schema_on_an_empty_database(database: Database) -> None:
    empty = f"{database.name}_empty"
    cluster = database.cluster
    cluster.execute(
        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(empty), sql.Identifier(database.role))
    )
    try:
        result = _run(
            [str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"], _env(database, POSTGRES_DB=empty)
        )
        assert result.returncode == 0, result.stderr[-2000:]
        tables = cluster.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", dbname=empty
        )
        assert {"alembic_version", "channels", "messages"} <= {t[0] for t in tables}
        assert_no_secrets(result.stdout + result.stderr, [database.password])
    finally:
        cluster.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(empty)))


# -- what every database failure is logged as -------------------------------------------------


def _connect_error(**params: object) -> psycopg2.OperationalError:
    """The error of a plain psycopg2 connect (no gevent, no pool, no wait callback).

    An app built earlier in this process (the session's template database makes one) installed
    commng_rotation.bounds' wait callback for every psycopg2 connection. It is set aside here,
    so that what is classified is libpq's own error, and a silent listener is bounded by
    connect_timeout (2 s), not by that callback's default wait (6 s) as before.
    """
    settings = {"dbname": "comm_ng", "user": "commng", "password": "x#?%&=+", "connect_timeout": 2, **params}
    callback = psycopg2.extensions.get_wait_callback()
    psycopg2.extensions.set_wait_callback(None)
    try:
        with pytest.raises(psycopg2.OperationalError) as caught:
            psycopg2.connect(**settings)
    finally:
        psycopg2.extensions.set_wait_callback(callback)
    return caught.value


def _assert_reason(exc: BaseException, reason: str, code: str = "OperationalError") -> None:
    assert describe_error(exc) == reason
    assert error_code(exc) == code
    assert "e3q8" not in describe_error(exc) + error_code(exc)


def test_a_closed_port_is_connection_refused_also_through_sqlalchemy() -> None:
    port = free_port()
    _assert_reason(_connect_error(host="127.0.0.1", port=port), "connection refused")
    url = sa.URL.create("postgresql+psycopg2", "commng", "x#?%&=+", "127.0.0.1", port, "comm_ng")
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with pytest.raises(sa.exc.OperationalError) as caught, engine.connect():
            pass
    finally:
        engine.dispose()
    assert caught.value.code == "e3q8"  # SQLAlchemy's documentation link, not an error code
    _assert_reason(caught.value, "connection refused")


def test_a_listener_that_never_answers_is_a_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody ever answers
        exc = _connect_error(host="127.0.0.1", port=listener.getsockname()[1], sslmode="disable")
    _assert_reason(exc, "timeout")


def test_a_name_that_does_not_resolve_is_a_dns_failure() -> None:
    # .invalid never resolves (RFC 2606): one query to the local resolver, no traffic to a host.
    exc = _connect_error(host="nonexistent.invalid", port=5432)
    _assert_reason(exc, "DNS lookup failed")
    assert "nonexistent" not in describe_error(exc)


def test_a_wrong_password_is_password_authentication_failed(database: Database) -> None:
    wrong = new_password()
    exc = _connect_error(
        host="127.0.0.1", port=database.cluster.port, user=database.role, password=wrong, dbname=database.name
    )
    _assert_reason(exc, "password authentication failed", "OperationalError:28P01")
    assert_no_secrets(describe_error(exc) + error_code(exc), [wrong, database.password])


def test_tls_required_by_a_server_without_tls_is_a_tls_failure(database: Database) -> None:
    exc = _connect_error(
        host="127.0.0.1",
        port=database.cluster.port,
        user=database.role,
        password=database.password,
        dbname=database.name,
        sslmode="require",
    )
    _assert_reason(exc, "TLS failure")


def test_a_missing_database_and_a_role_at_its_limit_say_so(database: Database) -> None:
    login = {"host": "127.0.0.1", "port": database.cluster.port, "user": database.role}
    missing = _connect_error(**login, password=database.password, dbname=f"{database.name}_missing")
    _assert_reason(missing, "database does not exist")
    cluster: PostgresCluster = database.cluster
    cluster.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 0").format(sql.Identifier(database.role)))
    try:
        full = _connect_error(**login, password=database.password, dbname=database.name)
    finally:
        cluster.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(sql.Identifier(database.role)))
    _assert_reason(full, "too many connections")


@contextmanager
def _server_that_refuses_logins(sqlstate: str, message: str) -> Iterator[int]:
    """A listener on 127.0.0.1 that answers one login with PostgreSQL's ErrorResponse.

    What a server that is starting up, shutting down or full sends: libpq reports it as
    it would from PostgreSQL itself.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def answer() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            length = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))[0]
            conn.recv(length - 4, socket.MSG_WAITALL)  # the StartupMessage
            fields = f"SFATAL\0VFATAL\0C{sqlstate}\0M{message}\0\0".encode()
            conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(10)


@pytest.mark.parametrize(
    ("sqlstate", "message", "reason"),
    [
        ("57P03", "the database system is starting up", "database is starting up"),
        ("57P03", "the database system is shutting down", "database is shutting down"),
        ("53300", "sorry, too many clients already", "too many connections"),
    ],
)
def test_a_server_that_cannot_take_a_login_now_says_why(sqlstate: str, message: str, reason: str) -> None:
    with _server_that_refuses_logins(sqlstate, message) as port:
        exc = _connect_error(host="127.0.0.1", port=port, sslmode="disable", gssencmode="disable")
    _assert_reason(exc, reason)
