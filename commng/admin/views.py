"""The admin page and its JSON APIs: this worker's status, the history of every worker, "check now"."""

from __future__ import annotations

import math
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from flask import Blueprint, current_app, render_template, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from commng.admin import fleet
from commng.admin.auth import api_auth, closed_unless_configured, page_auth, remote_addr
from commng.db import db, replica_state
from commng.errors import APIError, error_response
from commng_rotation import (
    InvalidCursor,
    NoCredentials,
    RotationRecord,
    Trigger,
    count_by_trigger,
    error_code,
    get_runtime,
    list_events,
    worker_name,
)

__all__ = ["CHECK_MIN_INTERVAL_S", "CheckLimiter", "bp"]

log = structlog.get_logger("commng.admin")

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")
bp.before_request(closed_unless_configured)

# "Check now" asks Secrets Manager (and may rebuild the pool): at most once per 5 s per worker.
CHECK_MIN_INTERVAL_S = 5.0
PAGE_SIZE = 25
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
CURSOR_RE = re.compile(r"[0-9a-f]{32}")
LIMITER = "commng.admin.check_limiter"
# The operations page (compiled when the app is built: commng.admin.init_app).
PAGE_TEMPLATE = "admin/index.html"
_DB_ERRORS = (DBAPIError, PoolTimeout, NoCredentials)


class CheckLimiter:
    """At most one check per ``interval_s`` in this worker."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        """0 when a check may run now (and reserve it), else the seconds to wait."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return max(1, math.ceil(self._next - now))
            self._next = now + self.interval_s
            return 0


def _status() -> dict[str, Any]:
    """Runtime.status() with engine ages and the history writer's figures."""
    status: dict[str, Any] = dict(get_runtime().status())
    now = datetime.now(UTC)
    for bind in status["binds"]:
        for engine in [bind["active_engine"], *bind["draining_engines"]]:
            if engine is not None:
                age = now - datetime.fromisoformat(engine["created_at"])
                engine["age_s"] = round(age.total_seconds(), 1)
    status["history_writer"] = get_runtime().history.status()
    replica = replica_state()
    # Whether reads go to the replica now, why not, its measured lag, and reads per bind.
    status["replica_reads"] = replica.status() if replica is not None else None
    return status


def _cursor() -> str | None:
    raw = request.args.get("before_id")
    if raw is None or raw == "":
        return None
    if not CURSOR_RE.fullmatch(raw):
        raise APIError(400, "invalid_parameter", "before_id must be the id of an event (32 hex digits)")
    return raw


def _limit() -> int:
    raw = request.args.get("limit")
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 4 or not 1 <= int(raw) <= MAX_LIMIT:
        raise APIError(400, "invalid_parameter", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _page(limit: int) -> tuple[list[RotationRecord], str | None]:
    try:
        return list_events(db.session, limit, _cursor(), service=get_runtime().service)
    except InvalidCursor:
        raise APIError(400, "invalid_parameter", "before_id names no event in the history") from None


@bp.get("/", strict_slashes=False)
@page_auth
def index() -> Any:
    """The operations page: this worker's status, then the history of every worker."""
    status = _status()
    history_error = None
    try:
        events, next_before_id = _page(PAGE_SIZE)
        counts = count_by_trigger(db.session, service=get_runtime().service)
    except _DB_ERRORS as exc:
        db.session.rollback()
        events, next_before_id, counts = [], None, {}
        history_error = f"the history cannot be read now ({error_code(exc)})"
    fleet_view, fleet_error = _fleet()
    return render_template(
        PAGE_TEMPLATE,
        status=status,
        events=events,
        counts=counts,
        next_before_id=next_before_id,
        first_page=_cursor() is None,
        history_error=history_error,
        now=datetime.now(UTC),
        triggers=[t.value for t in Trigger],
        fleet=fleet_view,
        fleet_error=fleet_error,
        layout=fleet.layout,
    )


def _fleet() -> tuple[dict[str, Any] | None, str | None]:
    """The fleet view, or None and why it cannot be read (the page still renders)."""
    try:
        return fleet.fleet_view(db.session, get_runtime()), None
    except _DB_ERRORS as exc:
        db.session.rollback()
        return None, f"the fleet cannot be read now ({error_code(exc)})"


@bp.get("/api/fleet")
@api_auth
def api_fleet() -> Any:
    """Every worker seen in the last 3 intervals, who is on AWSCURRENT, the recent rotations."""
    view, error = _fleet()
    if view is None:
        raise APIError(503, "database_unavailable", error or "the fleet cannot be read now")
    return view


@bp.get("/api/status")
@api_auth
def api_status() -> Any:
    """This worker's status as JSON, with the history's counts per trigger and outcome."""
    status = _status()
    try:
        status["history_counts"] = count_by_trigger(db.session, service=get_runtime().service)
    except _DB_ERRORS as exc:
        db.session.rollback()
        status["history_counts"] = None
        status["history_error"] = error_code(exc)
    return status


@bp.get("/api/rotations")
@api_auth
def api_rotations() -> Any:
    """The persisted history, newest first; ``next_before_id`` is the next page's cursor."""
    events, next_before_id = _page(_limit())
    return {"events": [e.as_dict() for e in events], "next_before_id": next_before_id}


@bp.post("/api/rotations/check")
@api_auth
def api_check() -> Any:
    """Make this worker check the secret now; returns that check's outcome."""
    runtime = get_runtime()
    if runtime.watcher is None:
        _log_action(409)
        message = "DB_SECRET_ID is not set: credentials come from the environment, no secret to check"
        raise APIError(409, "no_secret", message)
    limiter: CheckLimiter = current_app.extensions[LIMITER]
    wait_s = limiter.acquire()
    if wait_s:
        _log_action(429)
        response = error_response(429, "rate_limited", f"one check per {CHECK_MIN_INTERVAL_S:g} s per worker")
        response.headers["Retry-After"] = str(wait_s)
        return response
    results = runtime.watcher.check_once(trigger=Trigger.MANUAL)
    _log_action(200, results=[r.change for r in results], outcomes=[r.outcome for r in results])
    rotator = runtime.rotator()
    return {
        "worker": worker_name(),
        "results": [r.as_dict() for r in results],
        "current_version": rotator.current.version_id if rotator.current else None,
    }


def _log_action(status: int, **fields: Any) -> None:
    log.info("admin_action", action="rotation_check", status=status, **remote_addr(), **fields)
