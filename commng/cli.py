"""`flask --app wsgi rotation status|check|history`: the running service, seen from a shell.

The CLI is a short-lived process of its own: its own engine, no watcher, no workers.
So nothing here reports that process's runtime state. ``status`` and ``history`` read
what the service's workers persisted (``rotation_events``); ``status`` also asks Secrets
Manager for each bind's AWSCURRENT version (``commng.status``); ``check`` asks the
running service, through its admin API, to check the secret (the server records that
check in the history).

`flask --app wsgi db bootstrap` is here too: it reads the logins to create from the
settings and the secrets (the app's, the replica's), and ``commng.bootstrap`` makes them
in the database.

Every failure ends in one line (``click.ClickException``): a configuration error, a
database or Secrets Manager that cannot be reached, an admin API that is down or
refuses the token. No line holds a password or the token.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from flask_migrate.cli import db as migrate_group
from sqlalchemy.exc import SQLAlchemyError

from commng.bootstrap import bootstrap
from commng.db import db
from commng.status import format_status, latest_by_worker_and_bind, status_document
from commng_rotation import (
    Credentials,
    InvalidSecret,
    NoCredentials,
    RotationRecord,
    SecretsManagerSource,
    SecretsUnavailable,
    describe_error,
    get_runtime,
    list_events,
    make_secrets_client,
)
from config import Settings

__all__ = ["init_app"]

rotation = AppGroup(
    "rotation", help="Inspect and trigger database credential rotation of the running service."
)

CHECK_PATH = "/admin/api/rotations/check"
CHECK_TIMEOUT_S = 30.0
_READ_ERRORS = (SQLAlchemyError, NoCredentials)


def _database() -> str:
    """host:port/dbname of the history this process reads (never the login)."""
    url = db.engine.url
    return f"{url.host}:{url.port}/{url.database}"


def _read_history() -> list[RotationRecord]:
    try:
        return latest_by_worker_and_bind(db.session, get_runtime().service)
    except _READ_ERRORS as exc:
        db.session.rollback()
        raise click.ClickException(
            f"cannot read the rotation history in {_database()}: {describe_error(exc)}"
        ) from None


@rotation.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def status_command(as_json: bool) -> None:
    """The running service's state: each worker's latest refresh attempt per bind, and AWSCURRENT.

    Read from the rotation history every worker writes (a worker appears once it has
    recorded an attempt: a rotation, a failure, a manual check) and from Secrets
    Manager; not from this process, which is only the CLI. Each bind (the primary, the
    replica) is compared with its own secret's AWSCURRENT.
    """
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    document = status_document(_read_history(), get_runtime(), settings, _database())
    click.echo(json.dumps(document, indent=2) if as_json else format_status(document))
    failed = [b for b in document["binds"] if b["secret_error"] is not None]
    if failed:
        codes = ", ".join(
            b["secret_error"] if b["bind"] is None else f"{b['bind']}: {b['secret_error']}" for b in failed
        )
        raise click.ClickException(f"AWSCURRENT could not be read from Secrets Manager ({codes})")


def _without_userinfo(url: str) -> str:
    """``url`` as it may be printed: no user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and any loopback address (127.0.0.0/8, ::1); no name is resolved."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would send the Authorization header on, even to another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post_check(url: str, token: str) -> dict[str, Any]:
    """POST the admin API's check; its JSON answer, or ClickException with one line."""
    shown = _without_userinfo(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise click.ClickException(f"--url must be an http:// or https:// URL, got {shown}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise click.ClickException(
            "--url must be https:// for a host outside the loopback (ADMIN_TOKEN would travel "
            f"in clear), got {shown}"
        )
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url.rstrip("/") + CHECK_PATH,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Connection": "close", "Accept": "application/json"},
    )
    try:
        with _OPENER.open(request, timeout=CHECK_TIMEOUT_S) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except urllib.error.HTTPError as exc:
        with exc:  # it holds the answer's connection open
            message = _refusal(shown, exc)
        raise click.ClickException(message) from None
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, BaseException) else exc
        raise click.ClickException(
            f"the admin API at {shown} is unreachable ({describe_error(reason)}): "
            "is the service running there? (--url)"
        ) from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(
            f"the admin API at {shown} failed to answer ({describe_error(exc)})"
        ) from None


def _refusal(shown: str, exc: urllib.error.HTTPError) -> str:
    """One line for an admin API answer other than 200."""
    if exc.code == 401:
        return f"the admin API at {shown} refused ADMIN_TOKEN (401): it is not the running service's token"
    if exc.code == 404:
        return (
            f"no admin API at {shown} (404): the service runs without ADMIN_TOKEN, "
            "or --url points at something else"
        )
    if 300 <= exc.code < 400:
        return (
            f"the admin API at {shown} answered a redirect ({exc.code}), not followed: the token "
            "goes to --url only; give the URL the service answers at"
        )
    if exc.code == 429:
        wait = exc.headers.get("Retry-After", "a few")
        return f"the worker that answered checked the secret moments ago (429): retry in {wait} s"
    try:
        error = json.loads(exc.read())["error"]
        detail = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        detail = exc.reason
    return f"the admin API at {shown} answered {exc.code} ({detail})"


@rotation.command("check")
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="The running service (default: http://127.0.0.1:$PORT, PORT 8000 when unset).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the admin API's JSON answer.")
def check_command(url: str | None, as_json: bool) -> None:
    """Make the running service check the secret now (POST /admin/api/rotations/check).

    Sends ADMIN_TOKEN as a Bearer token. One worker, the one that takes the request,
    checks the secret and refreshes if AWSCURRENT moved, and records the check in the
    history (trigger manual). The other workers follow at their next poll, or at once
    when their next login is refused. Exit code 1 when the check failed.
    """
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    if not settings.admin_token:
        raise click.ClickException(
            "ADMIN_TOKEN is not set: the admin API needs the running service's token "
            '(local stack: eval "$(.venv/bin/python -m devstack env)")'
        )
    target = url or f"http://127.0.0.1:{settings.port}"
    answer = _post_check(target, settings.admin_token)
    results: list[dict[str, Any]] = answer.get("results") or []
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        for result in results:  # one per bind: the primary's secret, and the replica's
            bind = result.get("bind") or "primary"
            click.echo(f"worker {answer.get('worker')} checked the {bind} secret: {_check_line(result)}")
        click.echo(f"current version {answer.get('current_version') or '-'}")
        click.echo(
            "# one worker answered and recorded the check (trigger manual); the others follow "
            "at their next poll or at their first refused login"
        )
    failed = [r for r in results if r.get("result") == "error" or r.get("outcome") == "failed"]
    if failed:
        raise click.ClickException(f"the check failed on {answer.get('worker')}: {failed[0].get('error')}")


def _check_line(result: dict[str, Any]) -> str:
    if result.get("result") == "error":
        where = "Secrets Manager unavailable" if result.get("unavailable") else "check failed"
        return f"{where} ({result.get('error')})"
    if result.get("result") == "changed":
        error = f" ({result['error']})" if result.get("error") else ""
        return f"AWSCURRENT moved, refresh {result.get('outcome')}{error}"
    return "AWSCURRENT unchanged"


@rotation.command("history")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="Rows to print.")
def history_command(limit: int) -> None:
    """Print the persisted rotation history of every worker and task, newest first."""
    try:
        rows, _ = list_events(db.session, limit, service=get_runtime().service)
    except _READ_ERRORS as exc:
        db.session.rollback()
        raise click.ClickException(
            f"cannot read the rotation history in {_database()}: {describe_error(exc)}"
        ) from None
    click.echo(format_history(rows))


HISTORY_COLUMNS = (
    "occurred_at",
    "worker",
    "bind",
    "trigger",
    "outcome",
    "old_version",
    "new_version",
    "detection_ms",
    "swap_ms",
    "drained_ms",
    "error",
)


def _cells(row: RotationRecord) -> tuple[str, ...]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return (
        row.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
        row.worker,
        row.bind or "primary",
        row.trigger,
        row.outcome.upper() if row.outcome == "failed" else row.outcome,
        row.old_version or "-",
        row.new_version or "-",
        ms(row.detection_latency_ms),
        ms(row.swap_ms),
        ms(row.drained_ms),
        row.error or "",
    )


def format_history(rows: list[RotationRecord]) -> str:
    """A plain-text table (UTC times, milliseconds), or a line saying there is nothing."""
    if not rows:
        return "no rotation events recorded"
    table = [HISTORY_COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HISTORY_COLUMNS))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table)
    return "\n".join(lines)


def _app_login(settings: Settings) -> Credentials:
    if settings.db_app_iam_user:
        if settings.db_app_secret_id:
            raise click.ClickException("DB_APP_IAM_USER and DB_APP_SECRET_ID exclude each other: set one")
        return Credentials(settings.db_app_iam_user, "", settings.postgres_host, settings.postgres_port, "")
    if not settings.db_app_secret_id:
        raise click.ClickException(
            "DB_APP_SECRET_ID (or DB_APP_IAM_USER) must name the app login bootstrap creates"
        )
    return _secret_login(settings.db_app_secret_id, "app")


def _reader_login(settings: Settings) -> Credentials | None:
    return _secret_login(settings.db_replica_secret_id, "replica") if settings.db_replica_secret_id else None


def _secret_login(secret_id: str, what: str) -> Credentials:
    runtime = get_runtime()
    source = runtime.rotator().source
    client = (
        source.client if isinstance(source, SecretsManagerSource) else make_secrets_client(runtime.settings)
    )
    try:
        return SecretsManagerSource(client, secret_id, runtime.settings).fetch().credentials
    except (SecretsUnavailable, InvalidSecret) as exc:
        raise click.ClickException(f"cannot read the {what} secret: {exc}") from None


@click.command("bootstrap")
@with_appcontext
def bootstrap_command() -> None:
    """Create the owner and app roles, migrate as the owner, grant the app role its rows. Idempotent."""
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    iam = bool(settings.db_app_iam_user)
    changes = bootstrap(_app_login(settings), settings.db_owner_role, _reader_login(settings), iam)
    for change in changes:
        click.echo(change)
    if not changes:
        click.echo("nothing to change: roles, grants and schema are already in place")


def init_app(app: Flask) -> None:
    """Register the rotation command group, and ``bootstrap`` on Flask-Migrate's ``db`` group."""
    app.cli.add_command(rotation)
    migrate_group.add_command(bootstrap_command)
