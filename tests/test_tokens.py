"""ADMIN_TOKEN and METRICS_TOKEN from Secrets Manager (commng.tokens), against moto."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from config import ConfigError, load_settings
from tests.helpers import Database

ADMIN = "admin-token-from-the-secret-0123456789"
METRICS = "metrics-token-from-the-secret-0123456789"


def _secret(client: Any, name: str, value: str) -> str:
    arn: str = client.create_secret(Name=name, SecretString=value)["ARN"]
    return arn


def test_tokens_come_from_their_secrets(
    database: Database, secretsmanager: Any, make_app: Any, caplog: Any
) -> None:
    settings = database.settings(
        admin_token_secret_id=_secret(secretsmanager, "admin", ADMIN),
        metrics_token_secret_id=_secret(secretsmanager, "metrics", METRICS),
    )
    with caplog.at_level(logging.DEBUG):
        app = make_app(settings, secrets_client=secretsmanager)
        client = app.test_client()
        assert (
            client.get("/admin/api/status", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        )
        assert client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 401
    # botocore's own DEBUG lines (response bodies) are left out: the app's logging set-up pins
    # botocore at WARNING (tests/test_debug_logging.py), and this app factory skips it.
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("botocore"))
    assert logged
    assert ADMIN not in logged
    assert METRICS not in logged


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("short-secret", "ADMIN_TOKEN_SECRET_ID's secret must be at least 16 characters"),
        ("a token with spaces in it", "ADMIN_TOKEN_SECRET_ID's secret must be at least 16 characters"),
    ],
)
def test_a_secret_without_a_valid_token_stops_start_up_naming_the_variable(
    value: str, message: str, database: Database, secretsmanager: Any, make_app: Any
) -> None:
    settings = database.settings(admin_token_secret_id=_secret(secretsmanager, "bad", value))
    with pytest.raises(ConfigError) as refused:
        make_app(settings, secrets_client=secretsmanager)
    assert str(refused.value.message).startswith(message)
    assert value not in str(refused.value.message)


def test_a_secret_that_cannot_be_read_stops_start_up_with_the_code_only(
    database: Database, secretsmanager: Any, make_app: Any
) -> None:
    settings = database.settings(
        metrics_token_secret_id="arn:aws:secretsmanager:us-east-1:123456789012:secret:nope"
    )
    with pytest.raises(ConfigError) as refused:
        make_app(settings, secrets_client=secretsmanager)
    assert refused.value.message == (
        "METRICS_TOKEN_SECRET_ID: the secret could not be read from Secrets Manager "
        "(ClientError/ResourceNotFoundException)"
    ) or refused.value.message.startswith("METRICS_TOKEN_SECRET_ID: the secret could not be read")


def test_the_same_token_in_both_secrets_is_refused(
    database: Database, secretsmanager: Any, make_app: Any
) -> None:
    settings = database.settings(
        admin_token_secret_id=_secret(secretsmanager, "a", ADMIN),
        metrics_token_secret_id=_secret(secretsmanager, "m", ADMIN),
    )
    with pytest.raises(ConfigError, match=r"^METRICS_TOKEN_SECRET_ID must hold another token"):
        make_app(settings, secrets_client=secretsmanager)


def test_a_token_and_its_secret_id_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^ADMIN_TOKEN and ADMIN_TOKEN_SECRET_ID are both set"):
        load_settings({"POSTGRES_USER": "u", "ADMIN_TOKEN": ADMIN, "ADMIN_TOKEN_SECRET_ID": "arn:x"})
