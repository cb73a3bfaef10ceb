"""The failover and switchover scenarios' own figures, from the load's samples.

- ``first_write_after_move_ms``: from the moment the endpoint points at the new primary
  (it is reachable from then on) to the first acknowledged write (a 201) that completed
  after it. A write that waited through the event and lands then counts: that is when
  the service took writes again.
- ``write_gap_s``: the longest time between two acknowledged writes around the event, and
  ``write_stall_beyond_event_s``, the part of it past the event itself (the refusal of a
  failover, the read-only phase of a switchover).
- ``event_p99_ms`` / ``event_requests``: the requests in flight at any time from the moment
  writes stopped to one second after the move.
"""

from __future__ import annotations

import itertools
from typing import Any

from bench.measure import percentile
from devstack.processes import LoadResult

__all__ = ["move_figures"]


def move_figures(result: LoadResult, t0: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The figures above; {} for a scenario that moved nothing."""
    if "moved_at_s" not in extra:
        return {}
    stopped, moved = float(extra["writes_stopped_at_s"]), float(extra["moved_at_s"])
    ends = sorted(s.started - t0 + s.duration_ms / 1000 for s in result.samples if s.status == 201)
    after = [end for end in ends if end >= moved]
    around = [end for end in ends if stopped - 5 <= end <= moved + 5]
    gap = max((b - a for a, b in itertools.pairwise(around)), default=0.0)
    during = [
        s.duration_ms
        for s in result.samples
        if s.started - t0 < moved + 1 and s.started - t0 + s.duration_ms / 1000 > stopped
    ]
    p99 = percentile(during, 99)
    return {
        "first_write_after_move_ms": round((after[0] - moved) * 1000) if after else None,
        "write_gap_s": round(gap, 2),
        "write_stall_beyond_event_s": round(max(0.0, gap - (moved - stopped)), 2),
        "event_requests": len(during),
        "event_p99_ms": None if p99 is None else round(p99),
    }
