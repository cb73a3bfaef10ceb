"""The product's app, plus what ``make soak`` samples inside each worker.

A greenlet of each worker appends one JSON line every ``BENCH_SOAK_INTERVAL_S`` to
``$BENCH_SOAK_DIR/<pid>.jsonl``: its resident memory and open descriptors (``/proc/self``),
its greenlets (counted by the garbage collector, which tracks every greenlet), and its
engines and pools (``Runtime.status()``). Counting the greenlets walks the heap, a few
milliseconds every 10 s: a cost the soak pays, not the product.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import gevent
import greenlet

# The product's entry point patches the standard library first; nothing above needs it.
from wsgi import app

__all__ = ["app"]

PAGE = os.sysconf("SC_PAGE_SIZE")


def figures() -> dict[str, Any]:
    """This worker's figures now."""
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * PAGE
    from commng_rotation import get_runtime  # after wsgi: it imports boto3

    status = get_runtime(app).status()
    engines = [b["active_engine"] for b in status["binds"] if b["active_engine"]]
    engines += [e for b in status["binds"] for e in b["draining_engines"]]
    return {
        "pid": os.getpid(),
        "at": time.time(),
        "rss_bytes": rss,
        "fds": len(os.listdir("/proc/self/fd")),
        "greenlets": sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet)),
        "engines": len(engines),
        "pool_size": sum(e["pool"]["size"] for e in engines),
        "checked_out": sum(e["pool"]["checked_out"] for e in engines),
        "idle": sum(e["pool"]["idle"] for e in engines),
    }


def _sample_forever(directory: Path, interval_s: float) -> None:
    path = directory / f"{os.getpid()}.jsonl"
    while True:
        with path.open("a") as out:
            out.write(json.dumps(figures()) + "\n")
        gevent.sleep(interval_s)


_directory = os.environ.get("BENCH_SOAK_DIR")
if _directory:
    gevent.spawn(_sample_forever, Path(_directory), float(os.environ.get("BENCH_SOAK_INTERVAL_S", "10")))
