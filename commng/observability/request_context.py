"""The request id: taken from the caller or the ALB, or generated; bound to every log line.

``X-Request-ID`` wins, then the Root of the ALB's ``X-Amzn-Trace-Id``, else a new UUID.
The id is bound with structlog's contextvars (one context per greenlet under gevent),
so every line logged while the request runs carries it; it is echoed in the response's
``X-Request-ID``, where gunicorn's access log picks it up (``commng.logs``).
"""

from __future__ import annotations

import os
import re

import structlog
from flask import Flask, Response, g, request

__all__ = ["REQUEST_ID_HEADER", "current_request_id", "init_app", "request_id_from"]

REQUEST_ID_HEADER = "X-Request-ID"
TRACE_HEADER = "X-Amzn-Trace-Id"
# Ids are echoed and logged: accept only short, plain tokens; anything else gets a new id.
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
_TRACE_ROOT = re.compile(r"(?:^|;)\s*Root=([^;]+)")
_REQUEST_ID_KEY = "HTTP_X_REQUEST_ID"
_TRACE_KEY = "HTTP_X_AMZN_TRACE_ID"


def request_id_from(headers: dict[str, str] | None, new: str | None = None) -> str:
    """The id for a request with ``headers``: X-Request-ID, the trace Root, or ``new``."""
    headers = headers or {}
    return _resolve(headers.get(REQUEST_ID_HEADER), headers.get(TRACE_HEADER), new)


def _resolve(given: str | None, trace: str | None, new: str | None = None) -> str:
    if given is not None:
        given = given.strip()
        if _VALID_ID.fullmatch(given):
            return given
    if trace is not None:
        root = _TRACE_ROOT.search(trace)
        candidate = (root.group(1) if root else trace).strip()
        if _VALID_ID.fullmatch(candidate):
            return candidate
    return new or _new_id()


def _new_id() -> str:
    """A random (version 4) UUID as 32 hex digits, what ``uuid.uuid4().hex`` gives.

    Built from the 16 random bytes directly: ``uuid.UUID()`` validates its arguments
    in a dozen Python steps, per request.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def current_request_id() -> str | None:
    """The id of the request being handled, if any."""
    request_id: str | None = g.get("request_id")
    return request_id


def _bind() -> None:
    # The WSGI environ's keys for the two headers: one lookup each, no header parsing.
    environ = request.environ
    request_id = _resolve(environ.get(_REQUEST_ID_KEY), environ.get(_TRACE_KEY))
    g.request_id = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)


def _echo(response: Response) -> Response:
    request_id = current_request_id()
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _unbind(_: BaseException | None) -> None:
    # A kept-alive connection serves its next request in the same greenlet.
    structlog.contextvars.unbind_contextvars("request_id")


def init_app(app: Flask) -> None:
    """Bind a request id at the start of each request and echo it in the response."""
    # The factory calls this before any other init_app that adds a request hook, so the
    # id is bound before anything else runs (tests/test_logging.py checks the order).
    app.before_request(_bind)
    app.after_request(_echo)
    app.teardown_request(_unbind)
