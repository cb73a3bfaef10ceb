"""What a database or Secrets Manager error means, said without its message.

Every log line, metric label and one-line error that reports a failure goes through
here: ``describe_error`` (a few safe words), ``error_code`` (class and SQLSTATE),
``is_auth_failure`` and ``refusal_cause`` (a refused login, and why), ``is_transient`` (a
connection failure worth another attempt within an outage). They read the SQLSTATE and
libpq's message but never pass the message on, since it can name a host, a role or a
database. The engines (``commng_rotation.engines``) and the retry decide with them.
"""

from __future__ import annotations

import re
import socket
import ssl

import sqlalchemy as sa

from commng_rotation.credentials import InvalidSecret, SecretsUnavailable

__all__ = [
    "WRITER_ELSEWHERE",
    "NoCredentials",
    "describe_error",
    "error_code",
    "is_auth_failure",
    "is_transient",
    "refusal_cause",
]


class NoCredentials(RuntimeError):
    """No database credentials are known yet (Secrets Manager unreachable at start)."""


# SQLSTATEs that mean "the writer is elsewhere, or coming back": a write on a server that
# turned read-only (25006: a Blue/Green switchover's blue, a demoted primary, a standby still
# in recovery behind the name). Terminated and shutting-down backends (57P01, 57P02, 57P03)
# arrive as disconnects already.
WRITER_ELSEWHERE = frozenset({"25006"})


# How a refused password reads in libpq's message (its connection errors carry no SQLSTATE):
# PostgreSQL's own, and RDS's for an IAM token it does not accept.
_REFUSED_PASSWORD = ("password authentication failed", "PAM authentication failed")


def is_auth_failure(exc: BaseException) -> bool:
    """True for PostgreSQL's 'password authentication failed' (SQLSTATE 28P01, or 28000)."""
    orig = getattr(exc, "orig", exc)
    if getattr(orig, "pgcode", None) in {"28P01", "28000"}:
        return True
    text = str(orig)
    return any(words in text for words in _REFUSED_PASSWORD)


def error_code(exc: BaseException) -> str:
    """Class and SQLSTATE (or AWS error code) only: messages may carry details we do not control.

    SQLAlchemy's own ``exc.code`` (e.g. ``e3q8``) is a link into its documentation, not
    an error code: it is never used.
    """
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "pgcode", None)
    if code is None and not isinstance(exc, sa.exc.SQLAlchemyError):
        code = getattr(exc, "code", None)  # e.g. SecretsUnavailable's AWS error code
    if is_auth_failure(exc):
        code = "28P01"
    return f"{type(exc).__name__}:{code}" if code else type(exc).__name__


# A refused login's cause, by its SQLSTATE's condition name (a bounded set: metric labels).
_REFUSAL_CAUSES = {"28P01": "invalid_password", "28000": "invalid_authorization_specification"}


def refusal_cause(exc: BaseException) -> str:
    """Why PostgreSQL refused a login, as the condition name of its SQLSTATE.

    ``invalid_password`` (28P01: a wrong password, an expired or foreign IAM token) or
    ``invalid_authorization_specification`` (28000: no pg_hba entry, a role that may not
    log in). libpq's own refusals carry no SQLSTATE: the message decides, else ``other``.
    """
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "pgcode", None)
    if code in _REFUSAL_CAUSES:
        return _REFUSAL_CAUSES[code]
    if any(words in str(orig) for words in _REFUSED_PASSWORD):
        return "invalid_password"
    return "other"


# What happened, from the SQLSTATE of an error PostgreSQL sent during a session ...
_PGCODE_REASONS = {
    "28P01": "password authentication failed",
    "28000": "login rejected",
    "3D000": "database does not exist",
    "53300": "too many connections",
    "57P01": "connection terminated by the server",
    "57P02": "connection terminated by the server",
    "57014": "statement timeout",
    "42P01": "table does not exist",
}
# ... or from libpq's message (its connection failures carry no SQLSTATE), with every
# quoted part (host, role and database names) removed first. Checked in order: each
# entry is (reason, words that must all appear). Only the reason ever goes out.
_MESSAGE_REASONS = (
    ("password authentication failed", ("password authentication failed",)),
    ("database is starting up", ("the database system is starting up",)),
    ("database is starting up", ("the database system is not yet accepting connections",)),
    ("database is starting up", ("the database system is in recovery mode",)),
    ("database is shutting down", ("the database system is shutting down",)),
    ("too many connections", ("too many clients already",)),
    ("too many connections", ("too many connections",)),
    ("too many connections", ("remaining connection slots are reserved",)),
    ("login rejected", ("is not permitted to log in",)),
    ("login rejected", ("no pg_hba.conf entry",)),
    ("login rejected", ("role", "does not exist")),
    ("database does not exist", ("database", "does not exist")),
    ("DNS lookup failed", ("could not translate host name",)),
    ("DNS lookup failed", ("name or service not known",)),
    ("DNS lookup failed", ("temporary failure in name resolution",)),
    ("DNS lookup failed", ("nodename nor servname",)),
    ("connection refused", ("connection refused",)),
    ("timeout", ("timeout expired",)),
    ("timeout", ("timed out",)),
    ("statement timeout", ("statement timeout",)),
    ("no route to host", ("no route to host",)),
    ("network unreachable", ("network is unreachable",)),
    # A TLS session the server side ended (an instance going down, a proxy in front of one
    # that is): the connection ended, as without TLS, not a TLS failure.
    ("connection closed unexpectedly", ("ssl connection has been closed unexpectedly",)),
    ("connection closed unexpectedly", ("ssl syscall error", "eof detected")),
    ("TLS failure", ("ssl",)),
    ("TLS failure", ("certificate",)),
    ("connection terminated by the server", ("terminating connection",)),
    ("connection closed unexpectedly", ("server closed the connection unexpectedly",)),
    ("connection closed unexpectedly", ("could not receive data from server",)),
    ("connection closed unexpectedly", ("connection already closed",)),
)


# Connection failures that may mend within seconds (a restart, a failover's DNS flip).
_TRANSIENT_REASONS = frozenset(
    {
        "connection refused",
        "timeout",
        "DNS lookup failed",
        "database is starting up",
        "database is shutting down",
        "too many connections",
        "no route to host",
        "network unreachable",
        "connection closed unexpectedly",
        "connection terminated by the server",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for a failed connection attempt that may succeed if tried again shortly."""
    return _reason(exc) in _TRANSIENT_REASONS


def _reason(exc: BaseException) -> str | None:
    """The kind of failure of a database or socket error, in words; None when unknown."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(exc, sa.exc.TimeoutError):
        return "connection pool timeout"  # QueuePool limit reached: the database was never asked
    if isinstance(orig, ssl.SSLError):
        return "TLS failure"
    if isinstance(orig, socket.gaierror):
        return "DNS lookup failed"
    if isinstance(orig, ConnectionRefusedError):
        return "connection refused"
    if isinstance(orig, TimeoutError):
        return "timeout"
    pgcode = getattr(orig, "pgcode", None)
    if pgcode in _PGCODE_REASONS:
        return _PGCODE_REASONS[pgcode]
    text = re.sub(r'"[^"]*"', '""', str(orig)).lower()
    for reason, words in _MESSAGE_REASONS:
        if all(word in text for word in words):
            return reason
    return None


def describe_error(exc: BaseException) -> str:
    """What happened, in a few safe words, for logs and operators.

    ``connection refused``, ``timeout``, ``password authentication failed``, ``DNS lookup
    failed``, ``TLS failure``, ``database is starting up`` …: classified from the SQLSTATE
    and libpq's message, never the message itself (it can name a host); else the class.
    InvalidSecret, NoCredentials and SecretsUnavailable messages never hold values.
    """
    if isinstance(exc, InvalidSecret | NoCredentials | SecretsUnavailable):
        return str(exc)
    if is_auth_failure(exc):
        return "password authentication failed"
    return _reason(exc) or error_code(exc)
