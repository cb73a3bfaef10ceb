"""The replica scenarios' measurements: reads served by each bind over time, and their shares.

The app counts every read of a read-only route by the bind that served it
(``commng_db_reads_total{bind}``, prometheus_client multiprocess mode). The bench merges
the workers' counter files straight from PROMETHEUS_MULTIPROC_DIR, as /metrics does, every
``period_s`` of the run, so that a share can be taken over any interval: before, during
and after the standby is down, or around the replica's rotations.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["ReadsSampler", "read_counts", "replica_per_second", "summarize_reads"]

METRIC = "commng_db_reads"
BINDS = ("replica", "primary")
# Reads around a rotation: from AWSPENDING written to this long after AWSCURRENT moved.
AFTER_ROTATION_S = 5.0


def read_counts(prometheus_dir: Path) -> dict[str, int]:
    """Reads served so far by each bind, summed over every worker (dead ones included)."""
    counts = dict.fromkeys(BINDS, 0)
    files = sorted(str(p) for p in prometheus_dir.glob("counter_*.db"))
    for metric in MultiProcessCollector.merge(files, accumulate=True):
        if metric.name != METRIC:
            continue
        for sample in metric.samples:
            bind = sample.labels.get("bind")
            if sample.name == f"{METRIC}_total" and bind in counts:
                counts[bind] += int(sample.value)
    return counts


@dataclass
class ReadsSampler:
    """``read_counts`` every ``period_s`` (a thread): (seconds from t0, replica, primary)."""

    prometheus_dir: Path
    t0: float
    period_s: float = 0.2
    series: list[tuple[float, int, int]] = field(default_factory=list)
    skipped: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="bench-reads", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.sample()

    def sample(self) -> None:
        counts = read_counts(self.prometheus_dir)
        t = round(time.monotonic() - self.t0, 2)
        self.series.append((t, counts["replica"], counts["primary"]))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample()
            except Exception:  # a worker's counter file caught half-written: the next sample counts
                self.skipped += 1


def _at(series: list[tuple[float, int, int]], t: float) -> tuple[float, int, int]:
    """The last sample taken at or before ``t`` (the first one when none was)."""
    found = series[0]
    for sample in series:
        if sample[0] > t:
            break
        found = sample
    return found


def replica_per_second(series: list[tuple[float, int, int]]) -> list[int]:
    """Reads served by the replica in each whole second of the run: [0, 1), [1, 2) ..."""
    end = int(series[-1][0]) if series else 0
    return [_at(series, k)[1] - _at(series, k - 1)[1] for k in range(1, end + 1)]


def _share(series: list[tuple[float, int, int]], spans: list[tuple[float, float]]) -> dict[str, Any]:
    """Reads by bind within ``spans`` (seconds from t0) and the replica's share of them."""
    replica = primary = 0
    for start, end in spans:
        a, b = _at(series, start), _at(series, end)
        replica += b[1] - a[1]
        primary += b[2] - a[2]
    total = replica + primary
    return {"replica": replica, "primary": primary, "share": round(replica / total, 3) if total else None}


def summarize_reads(
    series: list[tuple[float, int, int]],
    rotations: list[dict[str, float]],
    extra: dict[str, Any],
    resumed: list[tuple[float, int]],
) -> dict[str, Any]:
    """The replica's share of reads over the run and its phases.

    ``rotations``: the scenario's rotation steps (seconds from t0); ``extra`` holds
    ``replica_down_at_s`` (the stop issued), ``replica_stopped_at_s`` (the stop done) and
    ``replica_up_at_s`` (the standby accepts connections again) when the standby was stopped;
    ``resumed``: (seconds from t0, worker pid) of the app's ``replica_reads_resumed`` lines.
    """
    end = series[-1][0]
    phases: dict[str, Any] = {"run": _share(series, [(0.0, end)])}
    if rotations:
        around = [(r["start"], min(end, r["end"] + AFTER_ROTATION_S)) for r in rotations]
        phases["around_rotations"] = _share(series, around)
    result: dict[str, Any] = {"phases": phases, "series": series}
    if "replica_up_at_s" in extra:
        down, up = float(extra["replica_down_at_s"]), float(extra["replica_up_at_s"])
        phases["before"] = _share(series, [(0.0, down)])
        phases["during"] = _share(series, [(down, up)])
        phases["after"] = _share(series, [(up, end)])
        at_up = _at(series, up)[1]
        first = next((t for t, replica, _ in series if t > up and replica > at_up), None)
        # By the counters: the first sample after the standby accepted that shows a replica read.
        result["back_on_replica_s"] = None if first is None else round(first - up, 2)
        # By the app's log: when each worker's reads went back to the replica. Only lines
        # after the standby was fully down: while it shuts down, a request that was already
        # connecting can still get through and log a resume.
        stopped = float(extra["replica_stopped_at_s"])
        first_by_worker: dict[int, float] = {}
        for t, pid in resumed:
            if t > stopped:
                first_by_worker.setdefault(pid, t)
        result["workers_back_s"] = sorted(round(t - up, 2) for t in first_by_worker.values())
    return result
