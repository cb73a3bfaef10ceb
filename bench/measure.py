"""Measurements taken outside the load generator: the app's JSON log, CPU time, the machine."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "app_log_events",
    "event_times",
    "machine",
    "passwords_in",
    "process_cpu_s",
    "self_cpu_s",
    "worker_pids",
]

# Error lines worth showing as they are (the expected 503s and refresh failures are counted).
_COUNTED_ERRORS = {"database_unavailable", "refresh_failed"}


def log_records(output: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) for every JSON line of gunicorn's output (LOG_FORMAT=json)."""
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield line, record


def app_log_events(output: str) -> dict[str, Any]:
    """The rotation events in gunicorn's JSON log (LOG_FORMAT=json)."""
    detection: dict[str, list[float]] = {}
    swaps: list[float] = []
    drains: list[float] = []
    counts: Counter[str] = Counter()
    errors: list[str] = []
    for line, record in log_records(output):
        event = record.get("event")
        if record.get("level") in {"error", "critical"} and event not in _COUNTED_ERRORS and len(errors) < 5:
            errors.append(line[:1500])
        if event == "refresh_succeeded":
            bind = f", {record['bind']}" if record.get("bind") else ""  # the primary's bind is None
            counts[f"refresh_succeeded ({record.get('trigger')}{bind})"] += 1
            if record.get("detection_latency_ms") is not None:
                detection.setdefault(str(record.get("trigger")), []).append(
                    float(record["detection_latency_ms"])
                )
            if record.get("swap_ms") is not None:
                swaps.append(float(record["swap_ms"]))
        elif event == "old_pool_closed":
            drains.append(float(record["drained_ms"]))
        elif event in {"refresh_failed", "secret_check_failed"}:
            counts[f"{event} ({record.get('error')})"] += 1
        elif event == "replica_unavailable":
            counts[f"replica_unavailable ({record.get('reason')})"] += 1
        elif event in {
            "database_unavailable",
            "request_retried_after_disconnect",
            "unhandled_exception",
            "startup_credentials_unavailable",
            "secret_version_unchanged_login",
            "replica_reads_resumed",
            "replica_lagging",
            "session_close_failed",
        }:
            counts[event] += 1
    return {
        "detection_ms": detection,
        "swap_ms": swaps,
        "drained_ms": drains,
        "counts": dict(counts),
        "errors": errors,
    }


def event_times(output: str, event: str, wall_t0: float) -> list[tuple[float, int]]:
    """(seconds from ``wall_t0``, worker pid) of every ``event`` line in the JSON log."""
    found: list[tuple[float, int]] = []
    for line in output.splitlines():
        if not line.startswith("{") or f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line)
            at = datetime.fromisoformat(record["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if record.get("event") == event:
            found.append((round(at - wall_t0, 3), int(record.get("pid") or 0)))
    return found


def passwords_in(output: str, passwords: Iterable[str]) -> int:
    """How many of ``passwords`` appear in ``output``, as they are or URL-encoded."""
    return sum(
        1
        for password in set(passwords)
        if any(
            form in output
            for form in {password, urllib.parse.quote(password), urllib.parse.quote_plus(password)}
        )
    )


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def worker_pids(output: str) -> list[int]:
    """The gunicorn worker pids, from their "Booting worker with pid: N" lines."""
    return [int(m) for m in re.findall(r"Booting worker with pid: (\d+)", output)]


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def self_cpu_s() -> float:
    """CPU seconds of this process (the load generator's threads and the moto server)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
