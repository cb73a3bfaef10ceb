"""The request id: taken from the caller or the ALB, or generated; bound to every log line.

``X-Request-ID`` wins, then the Root of the ALB's ``X-Amzn-Trace-Id``, else a new UUID.
The id is bound with structlog's contextvars (one context per greenlet under gevent),
so every line logged while the request runs carries it; it is echoed in the response's
``X-Request-ID``, where gunicorn's access log picks it up (``commng.logs``).
"""

from __future__ import annotations

import re
import uuid

import structlog
from flask import Flask, Response, g, request

__all__ = ["REQUEST_ID_HEADER", "current_request_id", "init_app", "request_id_from"]

REQUEST_ID_HEADER = "X-Request-ID"
TRACE_HEADER = "X-Amzn-Trace-Id"
# Ids are echoed and logged: accept only short, plain tokens; anything else gets a new id.
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
_TRACE_ROOT = re.compile(r"(?:^|;)\s*Root=([^;]+)")


def request_id_from(headers: dict[str, str] | None, new: str | None = None) -> str:
    """The id for a request with ``headers``: X-Request-ID, the trace Root, or ``new``."""
    headers = headers or {}
    given = headers.get(REQUEST_ID_HEADER, "").strip()
    if _VALID_ID.fullmatch(given):
        return given
    trace = headers.get(TRACE_HEADER, "")
    root = _TRACE_ROOT.search(trace)
    candidate = (root.group(1) if root else trace).strip()
    if _VALID_ID.fullmatch(candidate):
        return candidate
    return new or uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being handled, if any."""
    request_id: str | None = g.get("request_id")
    return request_id


def _bind() -> None:
    headers = {
        name: value
        for name in (REQUEST_ID_HEADER, TRACE_HEADER)
        if (value := request.headers.get(name)) is not None
    }
    request_id = request_id_from(headers)
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
