"""What ``Runtime.status()`` returns: one worker's rotation state, typed, JSON-ready.

Each is a ``TypedDict``: a plain dict at run time (a view can return it as JSON as it is),
with its keys and types known to a type checker. No field ever holds a credential: version
ids, timestamps, counts and pool figures only.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = [
    "BindStatus",
    "EngineStatus",
    "FanOutStatus",
    "PoolFigures",
    "PushStatus",
    "RuntimeStatus",
    "WatcherStatus",
]


class PoolFigures(TypedDict):
    """An engine's current pool: its size, and connections checked out, idle and in overflow."""

    size: int
    checked_out: int
    idle: int
    overflow: int


class EngineStatus(TypedDict):
    """An engine: when it was built (ISO 8601) and its pool."""

    created_at: str
    pool: PoolFigures


class BindStatus(TypedDict):
    """One bind (None: the default engine): its source, version, engines and refreshes."""

    bind: str | None
    source: str
    current_version: str | None
    active_engine: EngineStatus | None
    draining_engines: list[EngineStatus]
    refreshes_by_trigger: dict[str, int]


class WatcherStatus(TypedDict):
    """The secret watcher: whether it runs, its interval, its last and next check."""

    running: bool
    interval_ms: int
    last_check_at: str | None
    next_check_at: str | None
    consecutive_failures: int
    # Times the loop crashed and was restarted (logged as secret_watcher_restarted).
    restarts: int


class PushStatus(TypedDict):
    """The SQS consumer: whether it runs, and how many messages it received."""

    running: bool
    received: int


class FanOutStatus(TypedDict):
    """LISTEN/NOTIFY: whether this worker listens, and what it sent, heard and reconnected."""

    listening: bool
    sent: int
    received: int
    reconnects: int


class RuntimeStatus(TypedDict):
    """One worker's view of rotation (``Runtime.status()``)."""

    worker: str
    service: str
    secret_id: str | None
    watcher: WatcherStatus
    # The watcher failed DEGRADED_AFTER_FAILURES checks in a row: serving goes on with the
    # current credentials, but a rotation would not be seen until a reactive refresh.
    degraded: bool
    binds: list[BindStatus]
    push: PushStatus | None
    fanout: FanOutStatus | None
