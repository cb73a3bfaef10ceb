"""Rotation event records: one per refresh attempt, kept in memory per worker."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog

__all__ = ["EventLog", "Outcome", "RotationEvent", "Trigger", "worker_name"]

log = structlog.get_logger("commng_rotation.events")


class Trigger(StrEnum):
    """What started a check or a refresh (a ``str``: logs, rows and labels show the value)."""

    STARTUP = "startup"
    POLL = "poll"
    AUTH_FAILURE = "auth_failure"
    MANUAL = "manual"
    # A Secrets Manager event (EventBridge -> SQS) said AWSCURRENT moved (commng_rotation.push).
    PUSH = "push"
    # Another worker announced a new version over LISTEN/NOTIFY (commng_rotation.fanout).
    NOTIFY = "notify"
    # A new IAM token was signed for new connections (commng_rotation.iam); its version is
    # ``iam:<issue time>``.
    TOKEN = "token"  # noqa: S105 - a trigger's name, not a credential


class Outcome(StrEnum):
    """How a refresh attempt ended."""

    ROTATED = "rotated"
    FAILED = "failed"
    UNCHANGED = "unchanged"


def worker_name() -> str:
    """host:pid of this process, as it appears in every event and log line."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RotationEvent:
    """What one refresh attempt did. ``error`` is a class and code, never a message."""

    trigger: Trigger
    outcome: Outcome
    bind: str | None = None
    old_version: str | None = None
    new_version: str | None = None
    detection_latency_ms: float | None = None
    swap_ms: float | None = None
    drained_ms: float | None = None
    error: str | None = None
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    worker: str = field(default_factory=worker_name)
    # Client-generated, so a row written later (or updated with drained_ms) is the same event.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (timestamps as ISO 8601)."""
        data = asdict(self)
        data["occurred_at"] = self.occurred_at.isoformat()
        return data


class EventLog:
    """A bounded, newest-last list of events, with listeners for new and updated ones."""

    def __init__(self, maxlen: int = 500) -> None:
        self.maxlen = maxlen
        self._events: deque[RotationEvent] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.listeners: list[Callable[[RotationEvent], None]] = []
        self.update_listeners: list[Callable[[RotationEvent], None]] = []

    def record(self, event: RotationEvent) -> RotationEvent:
        """Keep ``event`` and tell the listeners (a failing listener is not our failure)."""
        with self._lock:
            self._events.append(event)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a listener bug must not stop rotation
                log.exception("event_listener_failed", listener=getattr(listener, "__name__", "?"))
        return event

    def updated(self, event: RotationEvent) -> None:
        """Tell the listeners that ``event`` gained a field (drained_ms arrives later)."""
        for listener in list(self.update_listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event_listener_failed", listener=getattr(listener, "__name__", "?"))

    def recent(self, limit: int = 50) -> list[RotationEvent]:
        """The newest ``limit`` events, newest first."""
        with self._lock:
            return list(reversed(self._events))[:limit]
