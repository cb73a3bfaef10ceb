"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask

from commng.db import db
from commng.rotation import NoCredentials, is_auth_failure, probe

__all__ = ["bp", "init_app"]

bp = Blueprint("health", __name__)

READY_TIMEOUT_S = 2.0


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the process runs; never touches the database or the watcher."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> Any:
    """200 when SELECT 1 succeeds through the current engine, else 503 with a reason."""
    try:
        probe(db.engine, READY_TIMEOUT_S)
    except NoCredentials:
        return {"status": "unavailable", "reason": "no database credentials yet"}, 503
    except Exception as exc:
        reason = "database authentication failed" if is_auth_failure(exc) else "database unreachable"
        return {"status": "unavailable", "reason": reason}, 503
    return {"status": "ready"}


def init_app(app: Flask) -> None:
    """Register /healthz and /readyz."""
    app.register_blueprint(bp)
