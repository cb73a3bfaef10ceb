"""`flask --app wsgi rotation status|check|history`: the running service, seen from a shell.

The CLI is a short-lived process of its own: its own engine, no watcher, no workers.
So nothing here reports that process's runtime state. ``status`` and ``history`` read
what the service's workers persisted (``rotation_events``); ``status`` also asks Secrets
Manager for each bind's AWSCURRENT version (``commng.status``); ``check`` asks the
running service, through its admin API, to check the secret (the server records that
check in the history).

Every failure ends in one line (``click.ClickException``): a configuration error, a
database or Secrets Manager that cannot be reached, an admin API that is down or
refuses the token. No line holds a password or the token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from flask_migrate.cli import db as migrate_group
from sqlalchemy.exc import SQLAlchemyError

from commng.bootstrap import bootstrap_command
from commng.db import db
from commng.status import format_status, latest_by_worker_and_bind, status_document
from commng_rotation import (
    NoCredentials,
    RotationRecord,
    describe_error,
    get_runtime,
    list_events,
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


def _post_check(url: str, token: str) -> dict[str, Any]:
    """POST the admin API's check; its JSON answer, or ClickException with one line."""
    shown = _without_userinfo(url)
    if urllib.parse.urlsplit(url).scheme not in {"http", "https"}:
        raise click.ClickException(f"--url must be an http:// or https:// URL, got {shown}")
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url.rstrip("/") + CHECK_PATH,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Connection": "close", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=CHECK_TIMEOUT_S) as response:  # noqa: S310
            answer: dict[str, Any] = json.load(response)
            return answer
    except urllib.error.HTTPError as exc:
        raise click.ClickException(_refusal(shown, exc)) from None
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
        for result in results:
            click.echo(f"worker {answer.get('worker')} checked the secret: {_check_line(result)}")
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


def init_app(app: Flask) -> None:
    """Register the rotation command group, and ``bootstrap`` on Flask-Migrate's ``db`` group."""
    app.cli.add_command(rotation)
    migrate_group.add_command(bootstrap_command)
