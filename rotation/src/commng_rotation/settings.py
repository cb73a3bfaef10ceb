"""What the rotation layer needs to know, as one frozen object the host application builds.

The layer reads no environment variable itself: the host maps its own configuration onto
``RotationSettings`` (CommNG does it in ``commng.app``), so an adopter keeps its own names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

__all__ = ["AUTH_MODES", "InvalidSettings", "RotationSettings"]

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# How the login proves itself: a password (from the secret, or the static one), or an IAM
# database authentication token signed for each new connection (commng_rotation.iam).
AUTH_MODES = ("secret", "iam")
# The sslmodes that refuse to run without TLS: an IAM token travels as a cleartext password.
TLS_SSLMODES = ("require", "verify-ca", "verify-full")
# RDS accepts an IAM token for 15 minutes after it was signed; reuse must end well before.
IAM_TOKEN_LIFETIME_S = 900
# What may name a service: it becomes part of a LISTEN/NOTIFY channel (an identifier).
_SERVICE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_CHANNEL = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class InvalidSettings(ValueError):
    """A ``RotationSettings`` field holds a value the layer cannot use (the message names it)."""


@dataclass(frozen=True)
class RotationSettings:
    """Where credentials come from, how often to look, and how engines are built."""

    # The Secrets Manager secret (name or ARN) holding {"username", "password", ...}.
    # None: use ``username``/``password`` below and never watch anything.
    secret_id: str | None = None
    aws_region: str | None = None
    refresh_interval_s: float = 300.0
    # How long an old pool may keep its checked-out connections after a swap.
    grace_period_s: float = 30.0
    # Defaults for the secret's optional keys, and the static login without a secret.
    host: str = "localhost"
    port: int = 5432
    dbname: str = "postgres"
    # True: ``host`` and ``port`` above win over the secret's keys (a read replica that
    # logs in with the primary's secret, whose ``host`` names the primary).
    pin_host: bool = False
    # True: the secret must name its host (a replica's own secret: without ``host``, the
    # default would be the primary's, and "replica" reads would quietly hit the primary).
    require_host: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # libpq's sslmode for every connection, and the CA file verify-ca/verify-full trust.
    sslmode: str = "require"
    ssl_root_cert: str | None = None
    pool_size: int = 5
    max_overflow: int = 5
    pool_timeout_s: int = 10
    # Bounds: a connection attempt, a statement (server-side statement_timeout, and the
    # longest a client waits on a silent server), and how long a request waits out an
    # outage (refused connections, a restart) before it fails.
    connect_timeout_s: int = 5
    statement_timeout_ms: int = 5000
    outage_wait_s: float = 10.0
    # The rotation schedule. Engines recycle pooled connections after this long
    # (``pool_recycle``): with a secret that alternates between two users, a connection
    # opened as one user never outlives the next rotation, so none is still open when that
    # user's password changes at the rotation after next.
    rotation_period_s: float = 7 * 24 * 3600.0
    application_name: str = "flask-app"
    history_retention_days: int = 90
    # Push and fan-out (commng_rotation.push, commng_rotation.fanout): the SQS queue that
    # receives the secret's EventBridge events (None: no push), the LISTEN/NOTIFY channel
    # workers announce adopted versions on, and whether they do.
    queue_url: str | None = None
    # None: "<service>_rotation".
    notify_channel: str | None = None
    fanout: bool = True
    # Which application this is, when several share one database: the rotation history and
    # fleet rows carry it (each app sees only its own), and the default notify channel
    # derives from it. None: ``application_name``, lower-cased, with "-" as "_".
    # a-z, 0-9 and _, starting with a letter, at most 40 characters.
    service: str | None = None
    # "secret": the password comes from ``secret_id`` (watched) or ``password``. "iam": no
    # password at all; each new connection logs in as ``username`` with an IAM token signed
    # for ``host``, ``port``, ``username`` and ``aws_region`` (RDS IAM database
    # authentication). No watcher and no Secrets Manager call then; TLS is required.
    auth: str = "secret"
    # How long one signed token is given to new connections before the next is signed
    # (tokens are valid for 15 minutes; an open connection outlives its token).
    iam_token_reuse_s: float = 600.0

    @property
    def service_name(self) -> str:
        """``service``, or the one derived from ``application_name``."""
        return self.service or self.application_name.lower().replace("-", "_")

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel workers of this service announce adopted versions on."""
        return self.notify_channel or f"{self.service_name}_rotation"

    def validate(self) -> None:
        """Raise ``InvalidSettings`` naming the first field that holds an unusable value."""
        for f in fields(self):
            if f.name in _CHECKS:
                _CHECKS[f.name](f.name, getattr(self, f.name))
        if not _SERVICE.fullmatch(self.service_name):
            what = "a-z, 0-9 and _ starting with a letter, at most 40 characters"
            if self.service is None:
                what += " (set service: the one derived from application_name is not)"
            _fail("service", what, self.service_name)
        if self.secret_id is None and self.username is None:
            raise InvalidSettings("RotationSettings.username must be set when secret_id is not set")
        if self.auth == "iam":
            self._validate_iam()

    def _validate_iam(self) -> None:
        """What IAM authentication needs: TLS, and nothing of a password or a secret to watch."""
        if self.sslmode not in TLS_SSLMODES:
            _fail(
                "sslmode",
                f"one of {'|'.join(TLS_SSLMODES)} when auth is 'iam' (the token is sent as a "
                "cleartext password, inside TLS only)",
                self.sslmode,
            )
        for name in ("secret_id", "password", "queue_url"):
            if getattr(self, name) is not None:
                shown = "<hidden>" if name == "password" else repr(getattr(self, name))
                raise InvalidSettings(
                    f"RotationSettings.{name} must be None when auth is 'iam' (there is no "
                    f"password and no secret to watch), got {shown}"
                )


def _fail(name: str, what: str, got: object) -> None:
    shown = "<hidden>" if name == "password" else repr(got)
    raise InvalidSettings(f"RotationSettings.{name} must be {what}, got {shown}")


def _port(name: str, value: object) -> None:
    if type(value) is not int or not 1 <= value <= 65535:
        _fail(name, "a TCP port from 1 to 65535", value)


def _number(minimum: float, unit: str, integer: bool = False) -> Callable[[str, object], None]:
    kind = "an integer" if integer else "a number"

    def check(name: str, value: object) -> None:
        ok = type(value) is int if integer else type(value) in (int, float)
        if not ok or not math.isfinite(value) or value < minimum:  # type: ignore[arg-type,operator]
            _fail(name, f"{kind} of {unit} >= {minimum:g}", value)

    return check


def _below(limit: float, unit: str) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        ok = type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
        if not ok or not 1 <= value < limit:  # type: ignore[operator]
            _fail(name, f"a number of {unit} from 1 to less than {limit:g}", value)

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if value not in choices:
            _fail(name, f"one of {'|'.join(choices)}", value)

    return check


def _text(
    pattern: re.Pattern[str] | None = None, what: str = "a non-empty string"
) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if value is None:
            return
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.fullmatch(value)):
            _fail(name, what, value)

    return check


def _flag(name: str, value: object) -> None:
    if type(value) is not bool:
        _fail(name, "True or False", value)


_CHECKS: dict[str, Callable[[str, object], None]] = {
    "secret_id": _text(),
    "aws_region": _text(),
    "refresh_interval_s": _number(0.01, "seconds"),
    "grace_period_s": _number(0, "seconds"),
    "host": _text(),
    "port": _port,
    "dbname": _text(),
    "pin_host": _flag,
    "require_host": _flag,
    "username": _text(),
    "sslmode": _one_of(SSLMODES),
    "ssl_root_cert": _text(),
    "pool_size": _number(1, "connections", integer=True),
    "max_overflow": _number(0, "connections", integer=True),
    "pool_timeout_s": _number(0, "seconds"),
    "connect_timeout_s": _number(1, "seconds", integer=True),
    "statement_timeout_ms": _number(1, "milliseconds", integer=True),
    "outage_wait_s": _number(0, "seconds"),
    "rotation_period_s": _number(1, "seconds"),
    "application_name": _text(),
    "history_retention_days": _number(1, "days", integer=True),
    "queue_url": _text(),
    "notify_channel": _text(_CHANNEL, "a LISTEN channel name: a-z, 0-9 and _, at most 63"),
    "fanout": _flag,
    "auth": _one_of(AUTH_MODES),
    "iam_token_reuse_s": _below(IAM_TOKEN_LIFETIME_S, "seconds"),
}
