"""IAM database authentication: no password, a token signed locally for each new connection.

RDS accepts, as the password of a login granted ``rds_iam``, a token that the client
signs itself (a SigV4 presigned ``connect`` request for one host, port, user and region,
``rds:generate_db_auth_token``; no network call) and that is valid for 15 minutes. Only
the login needs it: an open connection outlives its token, so nothing is recycled.

The token is supplied as the password of each NEW physical connection through the
engine's connect hook (``EngineFactory.login``), never frozen into an engine or a URL:
a pool creator that captured one token fails every login 15 minutes later
(aws-advanced-python-wrapper issue 1230). One token is given to new connections for
``RotationSettings.iam_token_reuse_s`` (10 minutes by default), so a worker signs at most
once per that period, however many connections it opens.

A login refused with a token (SQLSTATE 28P01 or 28000: expired, signed with a skewed
clock, a login without ``rds_iam``) drops the token and is tried once more with a fresh
one; refused again, the reason is logged (never the token) and kept for ``/readyz``.

The signer is handed in (``rds_signer(client)`` wraps a boto3 RDS client), so tests can
give it a botocore client of their own and a clock; ``make_rds_client`` builds the real
one inside the worker, after gevent has patched the standard library.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg2
import structlog

from commng_rotation.credentials import AWSCURRENT, Credentials, SecretVersion, aws_error_code
from commng_rotation.engines import NoCredentials, OpenConnection, is_auth_failure, refusal_cause
from commng_rotation.settings import RotationSettings

__all__ = ["IamTokenSource", "IssuedToken", "Signer", "make_rds_client", "rds_signer"]

log = structlog.get_logger("commng_rotation.iam")

# (host, port, user, region) -> the token.
Signer = Callable[[str, int, str, "str | None"], str]

# What /readyz and the log say when a fresh token was refused too (the token never is).
REFUSED_REASON = (
    "the database refused a freshly signed IAM token: is the login granted rds_iam, the token "
    "signed for the host, port, user and region it connects to, and the clock right?"
)


@dataclass(frozen=True)
class IssuedToken:
    """A token that was signed: when, and how long signing took. Never the token itself."""

    issued_at: datetime
    sign_us: float

    @property
    def version(self) -> str:
        """What the history and the fleet show as this login's version: ``iam:<issue time>``."""
        return "iam:" + self.issued_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    signed_at: float  # the source's clock (monotonic): reuse is measured on it
    issued: IssuedToken


def rds_signer(client: Any) -> Signer:
    """Sign with botocore: ``client.generate_db_auth_token`` of a boto3 RDS client."""

    def sign(host: str, port: int, user: str, region: str | None) -> str:
        token: str = client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername=user, Region=region)
        return token

    return sign


def make_rds_client(settings: RotationSettings) -> Any:
    """The boto3 RDS client that signs. Call only inside a worker, after gevent patching."""
    import boto3  # here, so that gunicorn's master never imports botocore/ssl

    return boto3.client("rds", region_name=settings.aws_region)


class IamTokenSource:
    """The login of ``settings.username`` at ``settings.host``, with an IAM token as its password.

    A ``CredentialSource`` that is never watched (nothing rotates: every token is new), and
    the engine's ``Login``: ``connect`` gives each new connection the current token.
    ``clock`` (monotonic seconds) and ``now`` (the issue time shown) are for tests.
    """

    name = "iam"
    watchable = False
    # RDS asks for the token as a cleartext password; sslmode keeps it inside TLS.
    require_auth = "password"

    def __init__(
        self,
        signer: Signer,
        settings: RotationSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if settings.username is None:
            raise NoCredentials("IAM authentication needs a username")
        self.signer = signer
        self.settings = settings
        self.reuse_s = settings.iam_token_reuse_s
        self.clock = clock
        self.now = now
        # Told each new token's issue (metrics, the history): never its value.
        self.listeners: list[Callable[[IssuedToken], None]] = []
        self.signed = 0
        # Set when a fresh token was refused too; cleared by the next login that succeeds.
        self.refusal: str | None = None
        self._token: _Token | None = None
        self._lock = threading.Lock()  # one signer at a time; the others reuse its token

    # -- CredentialSource ---------------------------------------------------------------

    def current_version_id(self) -> str | None:
        return None

    def fetch(self, stage: str = AWSCURRENT) -> SecretVersion:
        """The login without a password: ``connect`` adds a token to each connection."""
        s = self.settings
        assert s.username is not None  # checked in __init__
        return SecretVersion(Credentials(s.username, "", s.host, s.port, s.dbname), None)

    # -- the token ----------------------------------------------------------------------

    def token(self, credentials: Credentials) -> _Token:
        """The token for ``credentials``: the current one while it may be reused, else a new one."""
        with self._lock:
            token = self._token
            if token is not None and self.clock() - token.signed_at < self.reuse_s:
                return token
            token = self._token = self._sign(credentials)
        self.signed += 1
        log.info("iam_token_signed", issued_at=token.issued.version, sign_us=round(token.issued.sign_us))
        for listener in list(self.listeners):
            try:
                listener(token.issued)
            except Exception:  # a listener bug must not stop a login
                log.exception("iam_token_listener_failed", listener=getattr(listener, "__name__", "?"))
        return token

    def _sign(self, credentials: Credentials) -> _Token:
        # Signed for the host NAME the settings give (libpq keeps it as ``host`` for
        # verify-full and connects to the resolved ``hostaddr``): RDS checks that name.
        started = time.perf_counter()
        issued_at = self.now()
        try:
            value = self.signer(
                credentials.host, credentials.port, credentials.username, self.settings.aws_region
            )
        except Exception as exc:  # botocore: no AWS credentials, a bad region ...
            raise NoCredentials(f"an IAM token could not be signed: {aws_error_code(exc)}") from None
        sign_us = (time.perf_counter() - started) * 1_000_000
        return _Token(value, self.clock(), IssuedToken(issued_at, sign_us))

    def drop(self, token: _Token) -> None:
        """Forget ``token`` (refused): the next connection signs anew, unless one already did."""
        with self._lock:
            if self._token is token:
                self._token = None

    # -- Login --------------------------------------------------------------------------

    def connect(self, credentials: Credentials, open_connection: OpenConnection) -> Any:
        """Open a connection with the current token; refused, once more with a fresh one."""
        token = self.token(credentials)
        try:
            connection = open_connection(_with_password(credentials, token))
        except psycopg2.OperationalError as exc:
            if not is_auth_failure(exc):
                raise
            self.drop(token)
            log.warning(
                "iam_token_refused",
                cause=refusal_cause(exc),
                issued_at=token.issued.version,
                action="retrying once with a fresh token",
            )
            token = self.token(credentials)
            try:
                connection = open_connection(_with_password(credentials, token))
            except psycopg2.OperationalError as again:
                if is_auth_failure(again):
                    self.drop(token)
                    self.refusal = REFUSED_REASON
                    log.error(
                        "iam_login_refused",
                        cause=refusal_cause(again),
                        user=credentials.username,
                        host=credentials.host,
                        port=credentials.port,
                        region=self.settings.aws_region,
                        issued_at=token.issued.version,
                        reason=REFUSED_REASON,
                    )
                raise
        self.refusal = None
        return connection


def _with_password(credentials: Credentials, token: _Token) -> dict[str, Any]:
    return {**credentials.connect_params(), "password": token.value}
