"""The fleet on the admin page and at /admin/api/fleet: every live worker's version, and a timeline.

The rows come from ``rotation_workers`` (each worker writes its own after every check);
the timeline from ``rotation_events``. A rotation's start is estimated as the adopted
version's creation (``occurred_at - swap_ms - detection_latency_ms``); each worker's row
then shows detection (creation to fetch), swap (fetch, build, test, swap) and drain (swap
to old pool closed). "The secret's current version" is AWSCURRENT as DescribeSecret
answers it, asked at most once per ``CURRENT_CACHE_S`` per worker; when Secrets Manager
cannot be asked, the serving worker's own version stands in (and says so).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

from flask import current_app

from commng_rotation import STALE_INTERVALS, Runtime, SecretsUnavailable, list_workers, recent_rotations

__all__ = ["CURRENT_CACHE_S", "fleet_view", "layout"]

CURRENT_CACHE_S = 10.0
_CACHE = "commng.admin.secret_current_version"

# SVG geometry (px): a label column, then the time axis.
WIDTH = 760
LABEL_W = 250
ROW_H = 18
BAR_H = 12
HEAD_H = 20
AXIS_H = 18
PHASES = (("detection", "#9ecae1"), ("swap", "#f16913"), ("drain", "#74c476"))


class _CurrentVersion:
    """AWSCURRENT's version id, cached per worker (the page reloads every 10 s)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Per bind (None: the primary): (version, when it was read).
        self._values: dict[str | None, tuple[str | None, float]] = {}

    def get(self, runtime: Runtime, bind: str | None = None) -> tuple[str | None, str]:
        rotator = runtime.rotator(bind)
        own = rotator.current.version_id if rotator.current else None
        if not rotator.source.watchable:
            return own, "this worker"
        with self._lock:
            value, at = self._values.get(bind, (None, float("-inf")))
            if time.monotonic() - at < CURRENT_CACHE_S:
                return value, "secretsmanager"
        try:
            value = rotator.source.current_version_id()
        except SecretsUnavailable:
            return own, "this worker"
        with self._lock:
            self._values[bind] = (value, time.monotonic())
        return value, "secretsmanager"


def _secret_current(runtime: Runtime, bind: str | None = None) -> tuple[str | None, str]:
    cache = current_app.extensions.get(_CACHE)
    if cache is None:
        cache = current_app.extensions.setdefault(_CACHE, _CurrentVersion())
    result: tuple[str | None, str] = cache.get(runtime, bind)
    return result


def fleet_view(session: Any, runtime: Runtime) -> dict[str, Any]:
    """Workers seen within STALE_INTERVALS intervals, who is on the current version, the rotations."""
    interval_s = runtime.settings.refresh_interval_s
    seen_within = timedelta(seconds=interval_s * STALE_INTERVALS)
    workers = list_workers(session, seen_within, service=runtime.service)
    current, source = _secret_current(runtime)
    # Each bind's rows against its own secret's AWSCURRENT (the replica's secret may be another).
    by_bind = {bind: _secret_current(runtime, bind)[0] for bind in runtime.rotators if bind is not None}
    rows = []
    for state in workers:
        row = state.as_dict()
        wanted = current if state.bind is None else by_bind.get(state.bind)
        row["on_current"] = wanted is not None and state.current_version == wanted
        rows.append(row)
    return {
        "secret_current_version": current,
        "bind_current_versions": by_bind,
        "current_version_source": source,
        "interval_s": interval_s,
        "seen_within_s": seen_within.total_seconds(),
        "on_current": sum(1 for r in rows if r["on_current"]),
        "total": len(rows),
        "workers": rows,
        "rotations": _rotations(recent_rotations(session, service=runtime.service)),
    }


def _ms(value: float | None) -> float:
    return float(value) if value is not None else 0.0


def _rotations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group rotated events by version; times in seconds from the version's estimated creation."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        groups.setdefault(e["new_version"], []).append(e)
    rotations = []
    for version, group in groups.items():
        marks = []
        for e in group:
            swapped: datetime = e["occurred_at"]
            detected = swapped - timedelta(milliseconds=_ms(e["swap_ms"]))
            created = detected - timedelta(milliseconds=_ms(e["detection_latency_ms"]))
            marks.append((e, created, detected, swapped))
        origin = min(m[1] for m in marks)
        workers = []
        for e, _created, detected, swapped in marks:
            drained = e["drained_ms"]
            workers.append(
                {
                    "worker": e["worker"],
                    "bind": e["bind"],
                    "trigger": e["trigger"],
                    "detected_s": round((detected - origin).total_seconds(), 3),
                    "swapped_s": round((swapped - origin).total_seconds(), 3),
                    "drained_s": (
                        round((swapped - origin).total_seconds() + drained / 1000, 3)
                        if drained is not None
                        else None
                    ),
                    "detection_latency_ms": e["detection_latency_ms"],
                    "swap_ms": e["swap_ms"],
                    "drained_ms": drained,
                }
            )
        detections = [w["swapped_s"] for w in workers]
        rotations.append(
            {
                "version": version,
                "started_at": origin.isoformat(),
                "workers": workers,
                # First to last worker on the new version.
                "spread_s": round(max(detections) - min(detections), 3),
            }
        )
    return list(reversed(rotations))  # newest first


def layout(rotation: dict[str, Any]) -> dict[str, Any]:
    """SVG geometry of one rotation: a row per worker, a bar per phase, an axis in seconds."""
    workers = rotation["workers"]
    end = max([float(w["drained_s"] or w["swapped_s"]) for w in workers] + [0.001])
    scale = (WIDTH - LABEL_W - 10) / end

    def x(t: float) -> float:
        return round(LABEL_W + t * scale, 1)

    rows = []
    for i, w in enumerate(workers):
        y = HEAD_H + i * ROW_H
        spans = [(0.0, w["detected_s"]), (w["detected_s"], w["swapped_s"])]
        spans.append((w["swapped_s"], w["drained_s"] if w["drained_s"] is not None else w["swapped_s"]))
        bars = [
            {
                "phase": phase,
                "color": color,
                "x": x(a),
                "width": max(1.0, round((b - a) * scale, 1)),
                "title": f"{phase}: {b - a:.3f} s",
            }
            for (phase, color), (a, b) in zip(PHASES, spans, strict=True)
            if b > a or phase == "swap"
        ]
        rows.append(
            {"y": y, "text_y": y + BAR_H - 2, "label": f"{w['worker']} ({w['trigger']})", "bars": bars}
        )
    height = HEAD_H + len(workers) * ROW_H + AXIS_H
    ticks = [{"x": x(end * k / 4), "label": f"{end * k / 4:.2f} s"} for k in range(5)]
    return {
        "width": WIDTH,
        "height": height,
        "rows": rows,
        "ticks": ticks,
        "axis_y": height - 4,
        "bar_h": BAR_H,
    }
