"""`flask --app wsgi rotation status|check`."""

from __future__ import annotations

import json

import click
from flask import Flask
from flask.cli import AppGroup

from commng.runtime import get_runtime

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
    for result in runtime.watcher.check_once(trigger="manual"):
        click.echo(json.dumps(result.__dict__))
    if runtime.watcher.consecutive_failures:
        raise SystemExit(1)


def init_app(app: Flask) -> None:
    """Register the rotation command group."""
    app.cli.add_command(rotation)
