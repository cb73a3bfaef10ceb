"""One refresh as it goes, and what it reports when it ends.

A refresh (``commng_rotation.rotator``) reads AWSCURRENT, sometimes AWSPENDING, and ends
in one of three outcomes: unchanged, failed or rotated. ``Attempt`` carries what it
learnt on the way (what started it, which stage it reads, where AWSCURRENT pointed, when
the change was seen) and turns each outcome into its ``RotationEvent`` and its log line,
so that the rotator's steps read as steps and every outcome is reported the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from commng_rotation.credentials import AWSCURRENT, Credentials, SecretVersion
from commng_rotation.errors import describe_error, error_code
from commng_rotation.events import Outcome, RotationEvent, Trigger

__all__ = ["Attempt"]

# The rotator's lines: operators and dashboards know them by that logger.
log = structlog.get_logger("commng_rotation.rotator")


@dataclass
class Attempt:
    """One refresh as it goes: what started it and which stage it is reading now."""

    bind: str | None
    trigger: Trigger
    # The login PostgreSQL just refused (reactive refreshes only).
    failed: Credentials | None
    old_version: str | None
    stage: str = AWSCURRENT
    # The version AWSCURRENT pointed at when this attempt read it.
    current_version: str | None = None
    detected_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def fields(self) -> dict[str, Any]:
        """What every log line of the attempt says first: bind, trigger, stage, old version."""
        return dict(bind=self.bind, trigger=self.trigger, stage=self.stage, old_version=self.old_version)

    def detected(self, latest: SecretVersion) -> None:
        """Log that ``latest`` differs from the login in use, and that the refresh starts."""
        log.info("rotation_detected", **self.fields(), new_version=latest.version_id)
        log.info("refresh_started", bind=self.bind, trigger=self.trigger)

    def unchanged(self, new_version: str | None) -> RotationEvent:
        """The event of a refresh that found the login in use still current."""
        return RotationEvent(self.trigger, Outcome.UNCHANGED, self.bind, self.old_version, new_version)

    def failure(self, exc: Exception) -> RotationEvent:
        """Log why the refresh failed (never the message); its event."""
        log.error("refresh_failed", **self.fields(), error=error_code(exc), reason=describe_error(exc))
        return RotationEvent(self.trigger, Outcome.FAILED, self.bind, self.old_version, error=error_code(exc))

    def rotated(self, latest: SecretVersion, swap_ms: float) -> RotationEvent:
        """Log that ``latest`` is in use now; its event (``drained_ms`` comes later)."""
        event = RotationEvent(
            self.trigger,
            Outcome.ROTATED,
            self.bind,
            self.old_version,
            latest.version_id,
            detection_latency_ms=_latency_ms(latest, self.detected_at),
            swap_ms=swap_ms,
        )
        log.info(
            "refresh_succeeded",
            **self.fields(),
            new_version=latest.version_id,
            swap_ms=round(swap_ms, 1),
            detection_latency_ms=event.detection_latency_ms,
        )
        return event


def _latency_ms(version: SecretVersion, detected_at: datetime) -> float | None:
    if version.created_at is None:
        return None
    created = version.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return round(max(0.0, (detected_at - created).total_seconds() * 1000), 1)
