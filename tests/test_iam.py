"""DB_AUTH=iam, the token source: what it signs (with botocore), how long a token is reused,
and what a refused token leads to. No database here (tests/test_iam_login.py has one).
"""

from __future__ import annotations

import logging
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import boto3
import psycopg2
import pytest

from commng.observability import logs
from commng_rotation import InvalidSettings, IssuedToken, NoCredentials, RotationSettings
from commng_rotation.credentials import Credentials
from commng_rotation.engines import EngineFactory
from commng_rotation.iam import REFUSED_REASON, IamTokenSource, rds_signer
from config import ConfigError, load_settings
from tests.helpers import assert_no_secrets

HOST = "db.cluster-abc.eu-west-1.rds.amazonaws.com"
REFUSED = 'connection to server failed: FATAL:  PAM authentication failed for user "app_iam"'


@pytest.fixture(autouse=True)
def _logs_to_caplog() -> None:
    logs.route_to_stdlib()  # as the app does under test: structlog's lines reach caplog


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settings(**overrides: Any) -> RotationSettings:
    base: dict[str, Any] = {
        "auth": "iam",
        "username": "app_iam",
        "host": HOST,
        "port": 5433,
        "dbname": "comm_ng",
        "aws_region": "eu-west-1",
        "sslmode": "verify-full",
    }
    return RotationSettings(**{**base, **overrides})


def _source(clock: Clock | None = None, **overrides: Any) -> IamTokenSource:
    client = boto3.client("rds", region_name="us-east-1")  # the token's region is the settings'
    return IamTokenSource(rds_signer(client), _settings(**overrides), clock=clock or Clock())


def _credentials(source: IamTokenSource) -> Credentials:
    return source.fetch().credentials


def _query(token: str) -> tuple[str, dict[str, str]]:
    where, _, query = token.partition("/?")
    return where, dict(urllib.parse.parse_qsl(query))


def test_the_token_is_botocores_signature_for_the_host_name_port_user_and_region() -> None:
    source = _source()
    token = source.token(_credentials(source)).value
    where, query = _query(token)
    assert where == f"{HOST}:5433"  # the configured name, not a resolved address
    assert query["Action"] == "connect"
    assert query["DBUser"] == "app_iam"
    assert query["X-Amz-Credential"].split("/")[2:4] == ["eu-west-1", "rds-db"]
    assert query["X-Amz-Expires"] == "900"
    assert query["X-Amz-Signature"]


def test_the_login_carries_no_password_until_a_connection_asks_for_a_token() -> None:
    source = _source()
    credentials = _credentials(source)
    assert (credentials.username, credentials.host, credentials.port) == ("app_iam", HOST, 5433)
    assert credentials.password == ""
    assert source.signed == 0
    assert source.current_version_id() is None
    assert not source.watchable


def test_a_token_is_reused_within_the_window_and_signed_anew_after_it() -> None:
    clock = Clock()
    source = _source(clock, iam_token_reuse_s=600.0)
    issued: list[IssuedToken] = []
    source.listeners.append(issued.append)
    credentials = _credentials(source)
    first = source.token(credentials)
    clock.now += 599.9
    assert source.token(credentials) is first
    assert source.signed == 1
    clock.now += 0.2
    second = source.token(credentials)
    assert second is not first
    assert source.signed == 2
    assert [i.version for i in issued] == [first.issued.version, second.issued.version]
    assert all(i.version.startswith("iam:") and i.version.endswith("Z") for i in issued)
    assert first.value not in repr(first)
    assert first.value not in repr(issued)


def test_a_refused_token_is_dropped_and_the_login_tried_once_more_with_a_fresh_one(caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    source = _source(clock)
    tried: list[str] = []

    def open_connection(params: dict[str, Any]) -> str:
        tried.append(params["password"])
        if len(tried) == 1:
            raise psycopg2.OperationalError(REFUSED)
        return "connection"

    assert source.connect(_credentials(source), open_connection) == "connection"
    # Signed twice (within one second of the wall clock, botocore's signature is the same).
    assert len(tried) == 2
    assert source.signed == 2
    assert source.refusal is None
    assert "iam_token_refused" in caplog.text
    assert_no_secrets(caplog.text, tried)
    # The fresh token is the one reused now.
    assert source.token(_credentials(source)).value == tried[1]
    assert source.signed == 2


def test_a_fresh_token_refused_too_says_why_in_the_log_and_keeps_the_reason(caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    source = _source()
    tried: list[str] = []

    def refuse(params: dict[str, Any]) -> None:
        tried.append(params["password"])
        raise psycopg2.OperationalError(REFUSED)

    with pytest.raises(psycopg2.OperationalError):
        source.connect(_credentials(source), refuse)
    assert len(tried) == 2
    assert source.refusal == REFUSED_REASON
    assert "iam_login_refused" in caplog.text
    assert "rds_iam" in caplog.text
    assert_no_secrets(caplog.text, tried)
    # The refused token was dropped: the next login signs again, and clears the reason.
    source.connect(_credentials(source), lambda params: params["password"])
    assert source.signed == 3
    assert source.refusal is None


def test_other_connection_failures_are_not_retried_with_another_token() -> None:
    source = _source()
    tried: list[str] = []

    def unreachable(params: dict[str, Any]) -> None:
        tried.append(params["password"])
        raise psycopg2.OperationalError("connection refused")

    with pytest.raises(psycopg2.OperationalError):
        source.connect(_credentials(source), unreachable)
    assert len(tried) == 1
    assert source.signed == 1
    assert source.refusal is None


def test_a_token_that_cannot_be_signed_is_no_credentials_naming_the_error_only() -> None:
    def no_aws_credentials(host: str, port: int, user: str, region: str | None) -> str:
        raise RuntimeError(f"secret detail {host}")

    source = IamTokenSource(no_aws_credentials, _settings(), clock=Clock())
    with pytest.raises(NoCredentials) as raised:
        source.token(_credentials(source))
    assert str(raised.value) == "an IAM token could not be signed: RuntimeError"


def test_the_issue_time_is_the_wall_clock_in_utc() -> None:
    at = datetime(2026, 12, 8, 10, 15, 3, 123000, tzinfo=UTC)
    client = boto3.client("rds", region_name="us-east-1")
    source = IamTokenSource(rds_signer(client), _settings(), clock=Clock(), now=lambda: at)
    assert source.token(_credentials(source)).issued.version == "iam:2026-12-08T10:15:03.123Z"


# -- the engine: libpq may send the token in cleartext, and only then -------------------------


def test_with_iam_libpq_sends_a_cleartext_password_and_otherwise_only_scram() -> None:
    settings = _settings()
    factory = EngineFactory(settings)
    assert factory.options()["connect_args"]["require_auth"] == "scram-sha-256"
    factory.login = _source()
    assert factory.options()["connect_args"]["require_auth"] == "password"
    assert factory.options()["connect_args"]["sslmode"] == "verify-full"


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"sslmode": "disable"}, "RotationSettings.sslmode"),
        ({"sslmode": "prefer"}, "RotationSettings.sslmode"),
        ({"secret_id": "db/app"}, "RotationSettings.secret_id"),
        ({"password": "pw#?%&=+"}, "RotationSettings.password"),
        ({"queue_url": "https://sqs.eu-west-1.amazonaws.com/1/q"}, "RotationSettings.queue_url"),
        ({"iam_token_reuse_s": 900.0}, "RotationSettings.iam_token_reuse_s"),
        ({"iam_token_reuse_s": 0}, "RotationSettings.iam_token_reuse_s"),
        ({"auth": "kerberos"}, "RotationSettings.auth"),
        ({"username": None}, "RotationSettings.username"),
    ],
)
def test_the_layer_refuses_iam_settings_it_cannot_use(overrides: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidSettings) as raised:
        _settings(**overrides).validate()
    assert str(raised.value).startswith(names)
    assert "pw#?%&=+" not in str(raised.value)


def test_iam_settings_with_tls_validate() -> None:
    for sslmode in ("require", "verify-ca", "verify-full"):
        _settings(sslmode=sslmode).validate()
    assert RotationSettings(username="app").auth == "secret"


IAM_ENV = {"DB_AUTH": "iam", "POSTGRES_USER": "app_iam", "POSTGRES_HOST": HOST}


def test_db_auth_iam_needs_only_the_user_and_tls() -> None:
    settings = load_settings(IAM_ENV)
    assert settings.uses_iam
    assert not settings.uses_secrets_manager
    assert settings.db_iam_token_reuse_s == 600
    assert load_settings({**IAM_ENV, "DB_IAM_TOKEN_REUSE_S": "300"}).db_iam_token_reuse_s == 300
    assert load_settings({"POSTGRES_USER": "a", "POSTGRES_PASSWORD": "p"}).db_auth == "secret"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {**IAM_ENV, "POSTGRES_SSL": "false"},
            "DB_AUTH=iam needs TLS: POSTGRES_SSL must be require, verify-ca or verify-full, not disable",
        ),
        ({"DB_AUTH": "iam"}, "POSTGRES_USER must be set when DB_AUTH is iam (the login granted rds_iam)"),
        (
            {**IAM_ENV, "DB_SECRET_ID": "db/app"},
            "DB_SECRET_ID must be unset when DB_AUTH is iam (no password, no secret to watch)",
        ),
        (
            {**IAM_ENV, "POSTGRES_PASSWORD": "pw#?%&=+"},
            "POSTGRES_PASSWORD must be unset when DB_AUTH is iam (no password, no secret to watch)",
        ),
        ({**IAM_ENV, "DB_AUTH": "token"}, "DB_AUTH must be one of secret|iam, got 'token'"),
        (
            {**IAM_ENV, "DB_IAM_TOKEN_REUSE_S": "900"},
            "DB_IAM_TOKEN_REUSE_S must be an integer number of seconds from 1 to 899, got '900'",
        ),
    ],
)
def test_config_refuses_iam_without_what_it_needs_in_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    assert raised.value.message == message
    assert "\n" not in raised.value.message
