"""JSON errors for every failure: {"error": {"code", "message"}}, never a stack or secret."""

from __future__ import annotations

from typing import Any

import structlog
from flask import Flask, jsonify
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from commng_rotation import CommitOutcomeUnknown, NoCredentials, describe_error, error_code

__all__ = ["APIError", "init_app"]

log = structlog.get_logger("commng.errors")
# Seconds a client should wait before it asks again after a 503.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An expected client error with a stable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> Any:
    """A JSON error body with ``status``."""
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def init_app(app: Flask) -> None:
    """Register the handlers that turn every exception into a JSON error."""

    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> Any:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        code = (exc.name or "error").lower().replace(" ", "_")
        response = error_response(exc.code or 500, code, exc.description or exc.name)
        # What the exception adds to its own response: Allow on a 405, Retry-After, ...
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(DBAPIError)
    @app.errorhandler(PoolTimeout)
    @app.errorhandler(NoCredentials)
    def _database_unavailable(exc: Exception) -> Any:
        log.error(
            "database_unavailable",
            error=error_code(exc),
            reason=describe_error(exc),
            disconnect=bool(getattr(exc, "connection_invalidated", False)),
        )
        response = error_response(503, "database_unavailable", "the database is not available")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.errorhandler(CommitOutcomeUnknown)
    def _commit_outcome_unknown(exc: CommitOutcomeUnknown) -> Any:
        cause = exc.__cause__ or exc
        log.error("commit_outcome_unknown", error=error_code(cause), reason=describe_error(cause))
        response = error_response(
            503,
            "commit_outcome_unknown",
            "the write may have been applied: ask again with the same Idempotency-Key",
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled_exception", error=type(exc).__name__)
        return error_response(500, "internal_error", "internal server error")
