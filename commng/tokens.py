"""ADMIN_TOKEN and METRICS_TOKEN read from Secrets Manager once, when the app is built.

With ``ADMIN_TOKEN_SECRET_ID`` (or ``METRICS_TOKEN_SECRET_ID``) set, the token is the
secret's ``SecretString``: it never enters the process's environment, where an injected
variable stays readable (``/proc/<pid>/environ``) for the process's life. A secret that
cannot be read, or holds no valid token, stops start-up with one line naming the variable.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from commng_rotation import error_code
from config import ConfigError, Settings, bearer_token

__all__ = ["load_tokens"]

# Settings field -> the variable naming its secret.
_SECRET_IDS = {"admin_token": "ADMIN_TOKEN_SECRET_ID", "metrics_token": "METRICS_TOKEN_SECRET_ID"}


def load_tokens(settings: Settings, client: Any | None = None) -> Settings:
    """``settings`` with each token whose secret id is set read from Secrets Manager."""
    wanted = {field: getattr(settings, f"{field}_secret_id") for field in _SECRET_IDS}
    wanted = {field: secret_id for field, secret_id in wanted.items() if secret_id}
    if not wanted:
        return settings
    if client is None:
        client = _client(settings)
    values = {field: _read(client, _SECRET_IDS[field], secret_id) for field, secret_id in wanted.items()}
    loaded = replace(
        settings,
        admin_token=values.get("admin_token", settings.admin_token),
        metrics_token=values.get("metrics_token", settings.metrics_token),
    )
    if loaded.metrics_token is not None and loaded.metrics_token == loaded.admin_token:
        raise ConfigError("METRICS_TOKEN_SECRET_ID must hold another token than ADMIN_TOKEN's")
    return loaded


def _read(client: Any, variable: str, secret_id: str) -> str:
    try:
        raw = client.get_secret_value(SecretId=secret_id).get("SecretString")
    except Exception as exc:  # botocore's errors, the network's: one line, the code only
        raise ConfigError(
            f"{variable}: the secret could not be read from Secrets Manager ({error_code(exc)})"
        ) from None
    if not isinstance(raw, str):
        raise ConfigError(f"{variable}: the secret has no SecretString")
    return bearer_token(f"{variable}'s secret", raw)


def _client(settings: Settings) -> Any:
    """A Secrets Manager client with the same bounds as the rotation layer's (created in the worker)."""
    import boto3  # here, not at import: gunicorn's master must not import botocore before gevent patches ssl
    from botocore.config import Config

    config = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("secretsmanager", region_name=settings.aws_region, config=config)
