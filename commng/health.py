"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask
from sqlalchemy.exc import DBAPIError

from commng.db import db
from commng_rotation import NoCredentials, bounds, get_runtime, is_auth_failure, probe

__all__ = ["bp", "init_app"]

bp = Blueprint("health", __name__)

READY_TIMEOUT_S = 2.0


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the process runs; never touches the database or the watcher."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> Any:
    """200 when SELECT 1 succeeds through the current engine, else 503 with a reason; within 2 s.

    A pooled connection whose backend died (a rotation that terminates idle backends, a
    failover) is not the database being down: like the API, readiness tries once more on
    a fresh connection, inside the same bound.
    """
    with bounds.deadline(READY_TIMEOUT_S):
        for attempt in (1, 2):
            try:
                probe(db.engine, READY_TIMEOUT_S)
            except NoCredentials as exc:  # its messages never hold a value (e.g. a token unsigned)
                return {"status": "unavailable", "reason": str(exc)}, 503
            except DBAPIError as exc:
                if attempt == 1 and exc.connection_invalidated:
                    continue
                return _unavailable(exc)
            except Exception as exc:
                return _unavailable(exc)
            return {"status": "ready"}
    raise AssertionError("unreachable")  # pragma: no cover


def _unavailable(exc: Exception) -> tuple[dict[str, str], int]:
    if is_auth_failure(exc):
        # The credential source may know why (a refused IAM token); it never says the secret.
        reason = get_runtime().refusal_reason() or "database authentication failed"
    else:
        reason = "database unreachable"
    return {"status": "unavailable", "reason": reason}, 503


def init_app(app: Flask) -> None:
    """Register /healthz and /readyz."""
    app.register_blueprint(bp)
