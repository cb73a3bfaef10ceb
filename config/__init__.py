"""Typed settings for CommNG, read once from the environment.

Every value goes through a strict coercer: a bad value raises ``ConfigError`` whose
message names the variable and the accepted form, and never repeats a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

import click

__all__ = ["ConfigError", "Settings", "bearer_token", "check_or_exit", "load_settings"]

_SECRET_VARIABLES = frozenset({"POSTGRES_PASSWORD", "ADMIN_TOKEN", "METRICS_TOKEN"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(click.ClickException, ValueError):
    """A configuration value is missing or malformed; the message names the variable.

    A click exception too, so that a command run through ``flask --app wsgi`` that
    cannot build the app ends with the same one line as gunicorn, not a traceback.
    """

    exit_code: ClassVar[int] = 2

    def show(self, file: IO[Any] | None = None) -> None:
        """``configuration error: <message>``, one line on stderr."""
        print(f"configuration error: {self.message}", file=file or sys.stderr)


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    aws_region: str | None = None
    # How the service logs in: "secret" (a password: DB_SECRET_ID, watched, or
    # POSTGRES_USER/POSTGRES_PASSWORD) or "iam" (RDS IAM database authentication: a token
    # signed per new connection for POSTGRES_USER at POSTGRES_HOST; TLS required).
    db_auth: str = "secret"
    # iam: how long one token logs in new connections before the next is signed (< 900 s,
    # the token's lifetime).
    db_iam_token_reuse_s: int = 600
    db_secret_id: str | None = None
    db_secret_refresh_interval_ms: int = 300_000
    db_pool_grace_period_ms: int = 30_000
    postgres_host: str = "localhost"
    postgres_port: int = 5432
    postgres_db: str = "comm_ng"
    postgres_user: str | None = None
    postgres_password: str | None = field(default=None, repr=False)
    # libpq sslmode: disable | require | verify-ca | verify-full (true/false mean require/disable).
    postgres_ssl: str = "require"
    # The CA bundle verify-ca and verify-full trust (the image ships RDS's global bundle).
    postgres_ssl_root_cert: str | None = None
    postgres_pool_size: int = 20
    postgres_max_overflow: int = 5
    postgres_connect_timeout_s: int = 5
    postgres_statement_timeout_ms: int = 5000
    # How long a request waits out refused connections (a restart) before its 503: a
    # restart or a brief network blip fits; a Multi-AZ failover (DNS flip, 60-120 s) does
    # not, and should not hold requests that long behind a 60 s load-balancer timeout.
    db_outage_wait_ms: int = 10_000
    postgres_pool_timeout_s: int = 10
    admin_token: str | None = field(default=None, repr=False)
    rotation_history_retention_days: int = 90
    # How long an Idempotency-Key is remembered (commng/idempotency.py).
    idempotency_key_ttl_s: int = 24 * 3600
    # Issue 13: the SQS queue of the secret's EventBridge events, and LISTEN/NOTIFY fan-out.
    db_rotation_queue_url: str | None = None
    db_rotation_fanout: bool = True
    # How often Secrets Manager rotates the login (the rotation schedule). Pooled
    # connections are recycled after this long, so none opened as one user of an
    # alternating-users secret is still open when that user's password changes.
    db_rotation_period_s: int = 7 * 24 * 3600
    # `flask db bootstrap` only: the app secret whose login it creates, and the NOLOGIN
    # role that owns every table (the migrations run as it).
    db_app_secret_id: str | None = None
    db_owner_role: str = "commng_owner"
    # `flask db bootstrap` with IAM database authentication: the app login to create with no
    # password and GRANT rds_iam (instead of DB_APP_SECRET_ID's login and its clone).
    db_app_iam_user: str | None = None
    # Issue 12: a read replica (off unless POSTGRES_REPLICA_HOST or DB_REPLICA_SECRET_ID is
    # set). Its login is DB_REPLICA_SECRET_ID's, else the primary's (DB_SECRET_ID or
    # POSTGRES_USER); POSTGRES_REPLICA_HOST/PORT, when set, win over the secret's host.
    db_replica_secret_id: str | None = None
    postgres_replica_host: str | None = None
    postgres_replica_port: int | None = None
    # Reads go to the primary while the replica replays more than this far behind.
    db_replica_max_lag_ms: int = 5000
    port: int = 8000
    web_concurrency: int | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    # /metrics answers only ``Authorization: Bearer <METRICS_TOKEN>`` (404 without one)
    # unless METRICS_PUBLIC=true: what the service exposes is opened on purpose. Its own
    # token: the scraper's (sent over plain HTTP to every task) must not open /admin.
    metrics_public: bool = False
    metrics_token: str | None = field(default=None, repr=False)
    # Secrets Manager secrets that hold ADMIN_TOKEN and METRICS_TOKEN, read once at start-up
    # (commng.tokens) so that no token sits in the process's environment for its life.
    admin_token_secret_id: str | None = None
    metrics_token_secret_id: str | None = None
    # The clients /admin answers (commng.edge); None (unset): any client with the token,
    # () (ADMIN_ALLOWED_CIDRS=none): nobody.
    admin_allowed_cidrs: tuple[Network, ...] | None = None
    # The proxies in front of the app that append to X-Forwarded-For (the ALB: 1). The
    # client address is the entry that many from the right; 0: the peer's address.
    trusted_proxies: int = 0

    @property
    def sslmode(self) -> str:
        """libpq sslmode from POSTGRES_SSL."""
        return self.postgres_ssl

    @property
    def uses_replica(self) -> bool:
        """True when read-only routes read from a replica."""
        return bool(self.postgres_replica_host or self.db_replica_secret_id)

    @property
    def uses_iam(self) -> bool:
        """True when the service logs in with IAM tokens instead of a password."""
        return self.db_auth == "iam"

    @property
    def uses_secrets_manager(self) -> bool:
        """True when credentials come from Secrets Manager rather than the environment."""
        return bool(self.db_secret_id)


def _text(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} must not be empty when set")
    return value


def _int_at_least(minimum: int, unit: str = "") -> Callable[[str, str], int]:
    def coerce(name: str, raw: str) -> int:
        what = f"an integer{unit} >= {minimum}"
        shown = "<redacted>" if name in _SECRET_VARIABLES else repr(raw)
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {shown}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be {what}, got {shown}")
        return value

    return coerce


def _port(name: str, raw: str) -> int:
    value = _int_at_least(1)(name, raw)
    if value > 65535:
        raise ConfigError(f"{name} must be a TCP port from 1 to 65535, got {raw!r}")
    return value


def _boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"true", "1", "yes", "on"}:
        return True
    if value in {"false", "0", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


_SSLMODES = {
    "true": "require",
    "false": "disable",
    **{m: m for m in ("disable", "require", "verify-ca", "verify-full")},
}


def _sslmode(name: str, raw: str) -> str:
    # allow and prefer are refused: both fall back to cleartext when TLS fails.
    mode = _SSLMODES.get(raw.strip().lower())
    if mode is None:
        raise ConfigError(
            f"{name} must be one of disable|require|verify-ca|verify-full (or true|false), got {raw!r}"
        )
    return mode


def _choice(*choices: str, lower: bool = True) -> Callable[[str, str], str]:
    def coerce(name: str, raw: str) -> str:
        value = raw.strip().lower() if lower else raw.strip().upper()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {'|'.join(choices)}, got {raw!r}")
        return value

    return coerce


def _int_below(minimum: int, limit: int, unit: str) -> Callable[[str, str], int]:
    def coerce(name: str, raw: str) -> int:
        value = _int_at_least(minimum, unit)(name, raw)
        if value >= limit:
            raise ConfigError(f"{name} must be an integer{unit} from {minimum} to {limit - 1}, got {raw!r}")
        return value

    return coerce


def _secret(name: str, raw: str) -> str:
    if not raw:
        raise ConfigError(f"{name} must not be empty when set")
    return raw


# RFC 6750 b64token: what an ``Authorization: Bearer`` header can carry unambiguously.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_MIN_TOKEN_LENGTH = 16


def bearer_token(name: str, raw: str) -> str:
    """``raw`` if it is a Bearer-safe token of 16+ characters; else ConfigError naming ``name`` only."""
    if len(raw) < _MIN_TOKEN_LENGTH or not _BEARER_TOKEN.fullmatch(raw):
        raise ConfigError(
            f"{name} must be at least {_MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / "
            "(optionally ending in =), e.g. the output of `openssl rand -hex 32`"
        )
    return raw


# A role name bootstrap creates: plain lower-case identifiers only, at most 63 bytes.
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _role_name(name: str, raw: str) -> str:
    value = raw.strip()
    if not _ROLE_NAME.fullmatch(value):
        raise ConfigError(f"{name} must be a role name of a-z, 0-9 and _ (at most 63), got {raw!r}")
    return value


def _cidrs(name: str, raw: str) -> tuple[Network, ...]:
    value = raw.strip()
    if value.lower() == "none":
        return ()
    networks = []
    for item in value.split(","):
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{name} must be comma-separated CIDR blocks such as 203.0.113.0/24,2001:db8::/64 "
                f"(or none), got {item.strip()!r}"
            ) from None
    return tuple(networks)


def _queue_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"https?://[^\s/]+/\S+", value):
        raise ConfigError(
            f"{name} must be an SQS queue URL like "
            f"https://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE, got {raw!r}"
        )
    return value


_INTERVAL_MS = _int_at_least(1000, " number of milliseconds")
_DAYS = _int_at_least(1, " number of days")

# (variable, Settings field, coercer). A variable that is unset, or empty where empty
# means nothing, leaves the field at its default: the defaults live only in ``Settings``.
_VARIABLES: tuple[tuple[str, str, Callable[[str, str], object]], ...] = (
    ("AWS_REGION", "aws_region", _text),
    ("DB_AUTH", "db_auth", _choice("secret", "iam")),
    # RDS accepts a token for 900 s after it was signed.
    ("DB_IAM_TOKEN_REUSE_S", "db_iam_token_reuse_s", _int_below(1, 900, " number of seconds")),
    ("DB_SECRET_ID", "db_secret_id", _text),
    ("DB_SECRET_REFRESH_INTERVAL_MS", "db_secret_refresh_interval_ms", _INTERVAL_MS),
    ("DB_POOL_GRACE_PERIOD_MS", "db_pool_grace_period_ms", _int_at_least(0, " number of milliseconds")),
    ("POSTGRES_HOST", "postgres_host", _text),
    ("POSTGRES_PORT", "postgres_port", _port),
    ("POSTGRES_DB", "postgres_db", _text),
    ("POSTGRES_USER", "postgres_user", _text),
    ("POSTGRES_PASSWORD", "postgres_password", _secret),
    ("POSTGRES_SSL", "postgres_ssl", _sslmode),
    ("POSTGRES_SSL_ROOT_CERT", "postgres_ssl_root_cert", _text),
    (
        "POSTGRES_STATEMENT_TIMEOUT_MS",
        "postgres_statement_timeout_ms",
        _int_at_least(100, " number of milliseconds"),
    ),
    ("DB_OUTAGE_WAIT_MS", "db_outage_wait_ms", _int_at_least(0, " number of milliseconds")),
    ("POSTGRES_POOL_SIZE", "postgres_pool_size", _int_at_least(1)),
    ("POSTGRES_MAX_OVERFLOW", "postgres_max_overflow", _int_at_least(0)),
    ("POSTGRES_CONNECT_TIMEOUT_S", "postgres_connect_timeout_s", _int_at_least(1, " number of seconds")),
    ("POSTGRES_POOL_TIMEOUT_S", "postgres_pool_timeout_s", _int_at_least(1, " number of seconds")),
    ("ADMIN_TOKEN", "admin_token", bearer_token),
    ("ROTATION_HISTORY_RETENTION_DAYS", "rotation_history_retention_days", _DAYS),
    ("IDEMPOTENCY_KEY_TTL_S", "idempotency_key_ttl_s", _int_at_least(60, " number of seconds")),
    ("DB_ROTATION_QUEUE_URL", "db_rotation_queue_url", _queue_url),
    ("DB_ROTATION_FANOUT", "db_rotation_fanout", _boolean),
    ("DB_ROTATION_PERIOD_S", "db_rotation_period_s", _int_at_least(60, " number of seconds")),
    ("DB_APP_SECRET_ID", "db_app_secret_id", _text),
    ("DB_OWNER_ROLE", "db_owner_role", _role_name),
    ("DB_APP_IAM_USER", "db_app_iam_user", _role_name),
    ("DB_REPLICA_SECRET_ID", "db_replica_secret_id", _text),
    ("POSTGRES_REPLICA_HOST", "postgres_replica_host", _text),
    ("POSTGRES_REPLICA_PORT", "postgres_replica_port", _port),
    ("DB_REPLICA_MAX_LAG_MS", "db_replica_max_lag_ms", _int_at_least(0, " number of milliseconds")),
    ("PORT", "port", _port),
    ("WEB_CONCURRENCY", "web_concurrency", _int_at_least(1)),
    ("LOG_LEVEL", "log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR", lower=False)),
    ("LOG_FORMAT", "log_format", _choice("json", "console")),
    ("METRICS_PUBLIC", "metrics_public", _boolean),
    ("METRICS_TOKEN", "metrics_token", bearer_token),
    ("ADMIN_TOKEN_SECRET_ID", "admin_token_secret_id", _text),
    ("METRICS_TOKEN_SECRET_ID", "metrics_token_secret_id", _text),
    ("ADMIN_ALLOWED_CIDRS", "admin_allowed_cidrs", _cidrs),
    ("TRUSTED_PROXIES", "trusted_proxies", _int_at_least(0)),
)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build ``Settings`` from ``env`` (default: ``os.environ``); raise ConfigError on junk."""
    e = os.environ if env is None else env
    values: dict[str, object] = {}
    for name, attr, coerce in _VARIABLES:
        raw = e.get(name)
        if raw is None or (raw == "" and name not in _SECRET_VARIABLES):
            continue
        values[attr] = coerce(name, raw)
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.postgres_ssl in {"verify-ca", "verify-full"} and settings.postgres_ssl_root_cert is None:
        raise ConfigError(
            f"POSTGRES_SSL_ROOT_CERT must name a CA file when POSTGRES_SSL is {settings.postgres_ssl}"
        )
    if settings.postgres_password is not None and settings.postgres_user is None:
        raise ConfigError("POSTGRES_USER must be set when POSTGRES_PASSWORD is set")
    for token, secret_id in (
        ("ADMIN_TOKEN", settings.admin_token_secret_id),
        ("METRICS_TOKEN", settings.metrics_token_secret_id),
    ):
        if secret_id is not None and getattr(settings, token.lower()) is not None:
            raise ConfigError(f"{token} and {token}_SECRET_ID are both set: set one of them")
    if settings.metrics_token is not None and settings.metrics_token == settings.admin_token:
        raise ConfigError("METRICS_TOKEN must differ from ADMIN_TOKEN: the scraper's must not open /admin")
    if settings.uses_iam:
        _check_iam(settings)
    elif not settings.uses_secrets_manager and settings.postgres_user is None:
        raise ConfigError("POSTGRES_USER (and POSTGRES_PASSWORD) must be set when DB_SECRET_ID is not set")
    return settings


# What DB_AUTH=iam has no use for: there is no password, and no secret to watch.
_NOT_WITH_IAM = (
    ("DB_SECRET_ID", "db_secret_id"),
    ("POSTGRES_PASSWORD", "postgres_password"),
    ("DB_REPLICA_SECRET_ID", "db_replica_secret_id"),
    ("DB_ROTATION_QUEUE_URL", "db_rotation_queue_url"),
)


def _check_iam(settings: Settings) -> None:
    """DB_AUTH=iam needs POSTGRES_USER and TLS, and none of the password settings."""
    if settings.postgres_ssl == "disable":
        raise ConfigError(
            "DB_AUTH=iam needs TLS: POSTGRES_SSL must be require, verify-ca or verify-full, not disable"
        )
    if settings.postgres_user is None:
        raise ConfigError("POSTGRES_USER must be set when DB_AUTH is iam (the login granted rds_iam)")
    for variable, attr in _NOT_WITH_IAM:
        if getattr(settings, attr) is not None:
            raise ConfigError(
                f"{variable} must be unset when DB_AUTH is iam (no password, no secret to watch)"
            )


def check_or_exit(names: Collection[str] | None = None, env: Mapping[str, str] | None = None) -> None:
    """Check ``names`` (default: every variable) with the coercers of ``load_settings``.

    On junk, print ``configuration error: <message>`` (one line) on stderr and exit 2:
    for gunicorn.conf.py and the image's entrypoint, which run before any app exists.
    """
    e = os.environ if env is None else env
    try:
        if names is None:
            load_settings(e)
            return
        for name, _, coerce in _VARIABLES:
            raw = e.get(name)
            if name in names and raw is not None and (raw != "" or name in _SECRET_VARIABLES):
                coerce(name, raw)
    except ConfigError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
