"""`--pin-load`: the load generator on one CPU, the servers it measures on the others.

On a 2-core machine the load generator (this process: client threads, and moto when the
scenario uses Secrets Manager) competes with the gunicorn worker and PostgreSQL for the
same cores. Pinning separates them: this process and all its threads go to ``cpu``;
every process it started (gunicorn's master and workers) and the PostgreSQL cluster
(its postmaster, which pg_ctl detaches, and every backend: those forked later inherit
the postmaster's set) go to the other CPUs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pin_load"]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pin_load(cpu: int, daemons: tuple[int, ...] = ()) -> dict[str, list[int]]:
    """Pin this process's threads to ``cpu``; its descendants and ``daemons`` (a postmaster
    that pg_ctl detached), with theirs, to the other CPUs."""
    cpus = os.sched_getaffinity(0)
    if cpu not in cpus or len(cpus) < 2:
        raise SystemExit(f"--pin-load {cpu}: needs that CPU and at least one other (have {sorted(cpus)})")
    servers = cpus - {cpu}
    pinned = []
    for pid in [*_descendants(os.getpid()), *daemons, *(p for d in daemons for p in _descendants(d))]:
        try:
            os.sched_setaffinity(pid, servers)
            pinned.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    for task in Path("/proc/self/task").iterdir():  # every thread of this process
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except ProcessLookupError:
            continue
    return {"load_generator": [cpu], "servers": sorted(servers), "pinned_processes": pinned}
