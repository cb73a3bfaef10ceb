"""`flask --app wsgi rotation status|check|history`."""

from __future__ import annotations

import json

import click
from flask import Flask
from flask.cli import AppGroup

from commng.db import db
from commng.rotation import RotationRecord, Trigger, get_runtime, list_events

__all__ = ["init_app"]

rotation = AppGroup("rotation", help="Inspect and trigger database credential rotation.")


@rotation.command("status")
def status_command() -> None:
    """Print this process's rotation status as JSON."""
    click.echo(json.dumps(get_runtime().status(), indent=2, default=str))


@rotation.command("check")
def check_command() -> None:
    """Check the secret now and refresh if its AWSCURRENT version moved."""
    runtime = get_runtime()
    if runtime.watcher is None:
        raise click.ClickException("DB_SECRET_ID is not set: there is no secret to check")
    for result in runtime.watcher.check_once(trigger=Trigger.MANUAL):
        click.echo(json.dumps(result.as_dict()))
    if runtime.watcher.consecutive_failures:
        raise SystemExit(1)


@rotation.command("history")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="Rows to print.")
def history_command(limit: int) -> None:
    """Print the persisted rotation history of every worker and task, newest first."""
    rows, _ = list_events(db.session, limit)
    click.echo(format_history(rows))


HISTORY_COLUMNS = (
    "occurred_at",
    "worker",
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
    """Register the rotation command group."""
    app.cli.add_command(rotation)
