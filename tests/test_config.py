"""Settings: defaults, coercion, and one clear line per bad value (never a secret)."""

from __future__ import annotations

import pytest

from config import ConfigError, load_settings

BASE = {"POSTGRES_USER": "app", "POSTGRES_PASSWORD": "pw#?%&=+"}


def test_defaults_follow_the_design_document() -> None:
    s = load_settings(BASE)
    assert s.db_secret_refresh_interval_ms == 300_000
    assert s.db_pool_grace_period_ms == 30_000
    assert (s.postgres_port, s.postgres_db, s.postgres_pool_size) == (5432, "comm_ng", 20)
    assert s.postgres_ssl == "require"
    assert s.sslmode == "require"
    assert s.admin_token is None
    assert s.port == 8000
    assert s.log_format == "json"
    assert not s.uses_secrets_manager


def test_secret_id_alone_is_enough() -> None:
    s = load_settings(
        {"DB_SECRET_ID": "arn:aws:secretsmanager:us-east-1:1:secret:x", "AWS_REGION": "eu-west-1"}
    )
    assert s.uses_secrets_manager
    assert s.aws_region == "eu-west-1"
    assert s.postgres_user is None


def test_ssl_false_disables_tls() -> None:
    assert load_settings({**BASE, "POSTGRES_SSL": "false"}).sslmode == "disable"


def test_ssl_modes_that_verify_need_a_ca_file() -> None:
    with pytest.raises(
        ConfigError, match=r"^POSTGRES_SSL_ROOT_CERT must name a CA file when POSTGRES_SSL is verify-full$"
    ):
        load_settings({**BASE, "POSTGRES_SSL": "verify-full"})
    settings = load_settings({**BASE, "POSTGRES_SSL": "VERIFY-FULL", "POSTGRES_SSL_ROOT_CERT": "/ca.pem"})
    assert (settings.sslmode, settings.postgres_ssl_root_cert) == ("verify-full", "/ca.pem")


def test_statement_timeout_and_outage_wait_are_read() -> None:
    settings = load_settings({**BASE, "POSTGRES_STATEMENT_TIMEOUT_MS": "2500", "DB_OUTAGE_WAIT_MS": "0"})
    assert (settings.postgres_statement_timeout_ms, settings.db_outage_wait_ms) == (2500, 0)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "DB_SECRET_REFRESH_INTERVAL_MS",
            "abc",
            "DB_SECRET_REFRESH_INTERVAL_MS must be an integer number of milliseconds >= 1000, got 'abc'",
        ),
        (
            "DB_SECRET_REFRESH_INTERVAL_MS",
            "999",
            "DB_SECRET_REFRESH_INTERVAL_MS must be an integer number of milliseconds >= 1000, got '999'",
        ),
        (
            "DB_POOL_GRACE_PERIOD_MS",
            "-1",
            "DB_POOL_GRACE_PERIOD_MS must be an integer number of milliseconds >= 0, got '-1'",
        ),
        ("POSTGRES_POOL_SIZE", "0", "POSTGRES_POOL_SIZE must be an integer >= 1, got '0'"),
        (
            "POSTGRES_SSL",
            "maybe",
            "POSTGRES_SSL must be one of disable|require|verify-ca|verify-full (or true|false), got 'maybe'",
        ),
        (
            "POSTGRES_SSL",
            "prefer",
            "POSTGRES_SSL must be one of disable|require|verify-ca|verify-full (or true|false), got 'prefer'",
        ),
        ("POSTGRES_PORT", "70000", "POSTGRES_PORT must be a TCP port from 1 to 65535, got '70000'"),
        ("PORT", "http", "PORT must be an integer >= 1, got 'http'"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be one of json|console, got 'xml'"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of DEBUG|INFO|WARNING|ERROR, got 'loud'"),
        ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY must be an integer >= 1, got '0'"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, name: value})
    assert str(info.value) == expected
    assert "\n" not in str(info.value)


def test_missing_credentials_without_secret_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"POSTGRES_USER .* must be set when DB_SECRET_ID is not set"):
        load_settings({})


def test_password_without_user_is_an_error_that_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"DB_SECRET_ID": "x", "POSTGRES_PASSWORD": "s3cret#?%&=+"})
    assert "POSTGRES_USER" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_empty_password_is_rejected_without_echo() -> None:
    with pytest.raises(ConfigError, match=r"^POSTGRES_PASSWORD must not be empty when set$"):
        load_settings({"POSTGRES_USER": "app", "POSTGRES_PASSWORD": ""})


def test_settings_repr_never_shows_secrets() -> None:
    s = load_settings({**BASE, "ADMIN_TOKEN": "tok-0123456789+/=="})
    assert "pw#?%&=+" not in repr(s)
    assert "tok-0123456789+/==" not in repr(s)


@pytest.mark.parametrize(
    "token", ["short-token", "tok#?%&=+en-0123456789", "has space 0123456789", "a=b0123456789abcdef"]
)
def test_admin_token_that_a_bearer_header_cannot_carry_is_rejected_without_echo(token: str) -> None:
    with pytest.raises(ConfigError, match=r"^ADMIN_TOKEN must be at least 16 characters") as caught:
        load_settings({**BASE, "ADMIN_TOKEN": token})
    assert token not in str(caught.value)
