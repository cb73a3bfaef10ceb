"""The two events that move the RDS endpoint, done to a local primary, standby and endpoint.

- ``failover``, as RDS Multi-AZ does it when the primary's host dies: the primary crashes
  (``pg_ctl stop -m immediate``); the endpoint refuses connections for ``stale_s`` (the
  name still points at the dead host until DNS serves the new address); the synchronous
  standby is promoted; the endpoint points at it. No acknowledged COMMIT is lost: each
  waited for the standby (``PostgresCluster.set_synchronous``).
- ``switchover``, as an RDS Blue/Green switchover: the primary (blue) turns read-only, so a
  write there fails with 25006; the standby (green) replays everything; after
  ``read_only_s`` at least, green is promoted and the endpoint points at it; blue's
  backends are terminated (57P01) and blue stops.

Both take the endpoint as anything with ``refuse()`` and ``point_at(port)``: the in-process
``Endpoint`` of a test or the bench, or ``RemoteEndpoint``, the one ``make run`` holds.
Each returns the moments (monotonic seconds) a measurement needs, and reports its steps
through ``log``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from devstack.endpoint import send_control
from devstack.postgres import PostgresCluster

__all__ = ["MovableEndpoint", "Move", "RemoteEndpoint", "failover", "switchover"]

Log = Callable[[str], Any]


class MovableEndpoint(Protocol):
    def refuse(self) -> None: ...

    def point_at(self, target: int) -> None: ...


class RemoteEndpoint:
    """The endpoint of the running ``make run``, steered through its control socket."""

    def __init__(self, control: Path) -> None:
        self.control = control

    def refuse(self) -> None:
        send_control(self.control, "refuse")

    def point_at(self, target: int) -> None:
        send_control(self.control, "point_at", target)

    def status(self) -> dict[str, Any]:
        return send_control(self.control, "status")


@dataclass
class Move:
    """When each step happened (time.monotonic), for the bench and the tests."""

    kind: str
    started: float
    writes_stopped: float  # the primary crashed, or turned read-only
    moved: float  # the endpoint points at the new primary (it is reachable from here on)
    finished: float


def failover(
    endpoint: MovableEndpoint,
    primary: PostgresCluster,
    standby: PostgresCluster,
    stale_s: float = 3.0,
    log: Log = print,
) -> Move:
    """Crash ``primary``, refuse for ``stale_s``, promote ``standby``, point the endpoint at it."""
    started = time.monotonic()
    primary.stop("immediate")
    crashed = time.monotonic()
    log(f"failover: the primary 127.0.0.1:{primary.port} crashed (pg_ctl stop -m immediate)")
    endpoint.refuse()
    log(f"failover: the endpoint refuses connections for {stale_s:g} s (DNS still names the dead host)")
    # The stale name's lifetime is the fault itself: this sleep is what is being simulated.
    time.sleep(max(0.0, stale_s - (time.monotonic() - crashed)))
    standby.promote()
    log(f"failover: the standby 127.0.0.1:{standby.port} is promoted ({time.monotonic() - crashed:.1f} s in)")
    endpoint.point_at(standby.port)
    moved = time.monotonic()
    log(f"failover: the endpoint points at 127.0.0.1:{standby.port}, the primary now")
    return Move("failover", started, crashed, moved, time.monotonic())


def switchover(
    endpoint: MovableEndpoint,
    blue: PostgresCluster,
    green: PostgresCluster,
    read_only_s: float = 1.0,
    catch_up_timeout_s: float = 30.0,
    log: Log = print,
) -> Move:
    """Blue read-only; green replays all of it; green promoted and served; blue's sessions ended."""
    started = time.monotonic()
    blue.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    blue.execute("SELECT pg_reload_conf()")
    read_only = time.monotonic()
    log(f"switchover: blue 127.0.0.1:{blue.port} is read-only (writes there fail with 25006)")
    final_lsn = blue.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
    deadline = time.monotonic() + catch_up_timeout_s
    while not green.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (final_lsn,))[0][0]:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"green did not replay blue's WAL up to {final_lsn} in {catch_up_timeout_s:g} s"
            )
        time.sleep(0.02)  # a bounded poll of the standby's replay position
    log(f"switchover: green 127.0.0.1:{green.port} replayed blue's WAL up to {final_lsn}")
    # The read-only phase lasts read_only_s at least, like Blue/Green's blocked writes.
    time.sleep(max(0.0, read_only_s - (time.monotonic() - read_only)))
    green.promote()
    endpoint.point_at(green.port)
    moved = time.monotonic()
    log(f"switchover: green is promoted and the endpoint points at it ({moved - read_only:.1f} s read-only)")
    ended = blue.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )[0][0]
    blue.stop("fast")
    log(f"switchover: blue's {ended} sessions were terminated (57P01) and blue stopped")
    return Move("switchover", started, read_only, moved, time.monotonic())
