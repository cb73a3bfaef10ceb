"""Where database credentials come from: a Secrets Manager secret, or a static login.

The boto3 client is passed in (tests hand in a moto-backed one); nothing here creates
AWS clients except ``make_secrets_client``, which the worker calls after gevent has
patched the standard library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from commng_rotation.settings import RotationSettings

__all__ = [
    "CredentialSource",
    "Credentials",
    "InvalidSecret",
    "SecretVersion",
    "SecretsManagerSource",
    "SecretsUnavailable",
    "StaticSource",
    "make_secrets_client",
    "parse_secret",
    "static_credentials",
]

AWSCURRENT = "AWSCURRENT"
AWSPENDING = "AWSPENDING"


class InvalidSecret(ValueError):
    """The secret's value does not have the expected shape. The message never holds it."""


class SecretsUnavailable(RuntimeError):
    """Secrets Manager could not be asked (outage, throttling, access, missing secret)."""

    def __init__(self, code: str) -> None:
        super().__init__(f"Secrets Manager call failed: {code}")
        self.code = code


@dataclass(frozen=True)
class Credentials:
    """One login to PostgreSQL. ``repr`` and ``str`` never show the password."""

    username: str
    password: str = field(repr=False)
    host: str
    port: int
    dbname: str

    def connect_params(self) -> dict[str, Any]:
        """Keyword arguments for psycopg2.connect (a fresh dict every call)."""
        return {
            "user": self.username,
            "password": self.password,
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
        }


@dataclass(frozen=True)
class SecretVersion:
    """Credentials together with the secret version they were read from."""

    credentials: Credentials
    version_id: str | None
    created_at: datetime | None = None
    stage: str | None = None


class CredentialSource(Protocol):
    """What the rotator needs from a source of credentials."""

    name: str
    watchable: bool

    def current_version_id(self) -> str | None: ...

    def fetch(self, stage: str = AWSCURRENT) -> SecretVersion: ...


def parse_secret(text: str | None, defaults: RotationSettings) -> Credentials:
    """Parse an RDS-style secret; raise InvalidSecret naming the problem, not the value."""
    if text is None:
        raise InvalidSecret("secret has no SecretString")
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidSecret("secret is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidSecret("secret is not a JSON object")
    for key in ("username", "password"):
        if key not in data:
            raise InvalidSecret(f"secret is missing the key '{key}'")
        if not isinstance(data[key], str) or not data[key]:
            raise InvalidSecret(f"secret key '{key}' must be a non-empty string")
    if defaults.require_host and not defaults.pin_host and "host" not in data:
        raise InvalidSecret("secret is missing the key 'host' (a replica's secret must name the replica)")
    host = defaults.host if defaults.pin_host else data.get("host", defaults.host)
    dbname = data.get("dbname", defaults.dbname)
    port = defaults.port if defaults.pin_host else data.get("port", defaults.port)
    if not isinstance(host, str) or not host:
        raise InvalidSecret("secret key 'host' must be a non-empty string")
    if not isinstance(dbname, str) or not dbname:
        raise InvalidSecret("secret key 'dbname' must be a non-empty string")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidSecret("secret key 'port' must be a TCP port number")
    return Credentials(data["username"], data["password"], host, port, dbname)


def aws_error_code(exc: Exception) -> str:
    """The AWS error code of a botocore failure, or the client's error class."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


class SecretsManagerSource:
    """Reads one secret. Every botocore failure becomes ``SecretsUnavailable(code)``."""

    watchable = True

    def __init__(self, client: Any, secret_id: str, defaults: RotationSettings) -> None:
        self.client = client
        self.secret_id = secret_id
        self.defaults = defaults
        self.name = "secretsmanager"
        self.calls: dict[str, int] = {"DescribeSecret": 0, "GetSecretValue": 0}

    def current_version_id(self) -> str | None:
        """The version id that holds AWSCURRENT, by the cheap DescribeSecret call."""
        self.calls["DescribeSecret"] += 1
        try:
            described = self.client.describe_secret(SecretId=self.secret_id)
        except Exception as exc:  # botocore raises many unrelated classes
            raise SecretsUnavailable(aws_error_code(exc)) from None
        for version_id, stages in (described.get("VersionIdsToStages") or {}).items():
            if AWSCURRENT in stages:
                return str(version_id)
        return None

    def fetch(self, stage: str = AWSCURRENT) -> SecretVersion:
        """GetSecretValue for ``stage``, always naming the stage.

        Naming it is correct against AWS and needed with moto, which after a stage move
        still answers a stage-less call with the old value.
        """
        self.calls["GetSecretValue"] += 1
        try:
            got = self.client.get_secret_value(SecretId=self.secret_id, VersionStage=stage)
        except Exception as exc:
            raise SecretsUnavailable(aws_error_code(exc)) from None
        credentials = parse_secret(got.get("SecretString"), self.defaults)
        return SecretVersion(credentials, got.get("VersionId"), got.get("CreatedDate"), stage)


class StaticSource:
    """A login given in the settings; it never changes, so it is never watched."""

    watchable = False

    def __init__(self, settings: RotationSettings) -> None:
        self.settings = settings
        self.name = "static"

    def current_version_id(self) -> str | None:
        return None

    def fetch(self, stage: str = AWSCURRENT) -> SecretVersion:
        return SecretVersion(static_credentials(self.settings) or _missing(), None, None, None)


def static_credentials(settings: RotationSettings) -> Credentials | None:
    """The settings' username and password, or None when either is missing."""
    if settings.username is None or settings.password is None:
        return None
    return Credentials(settings.username, settings.password, settings.host, settings.port, settings.dbname)


def _missing() -> Credentials:
    raise InvalidSecret("no static username and password are configured")


def make_secrets_client(settings: RotationSettings) -> Any:
    """Create the boto3 client. Call only inside a worker, after gevent patching."""
    import boto3  # imported here so that gunicorn's master never imports botocore/ssl
    from botocore.config import Config

    config = Config(
        connect_timeout=2,
        read_timeout=5,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client("secretsmanager", region_name=settings.aws_region, config=config)
