"""`make failover`, `make switchover` and the first lines of `make status`, on the running stack.

``make run`` holds the endpoint (devstack/endpoint.py) and records in stack.json which
server it serves: ``serving`` is ``"standby"`` once a move promoted the standby, and the
next ``make run`` makes that server the primary and a new standby from it
(``shapes.adopt_promoted``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devstack import moves
from devstack.endpoint import EndpointUnavailable
from devstack.postgres import PostgresCluster
from devstack.stack import (
    ENDPOINT_CONTROL,
    pg_datadir,
    require_running,
    save_state,
    standby_base,
)

__all__ = ["describe", "move"]


def move(kind: str, stale_s: float = 3.0, read_only_s: float = 1.0) -> int:
    """Fail over, or switch over, the running stack's endpoint to its standby."""
    _, state = require_running()
    if state.get("serving") == "standby" or not state.get("standby_port"):
        raise SystemExit(_no_standby(state))
    password = state["superuser_password"]
    primary = PostgresCluster(pg_datadir(), state["pg_port"], password)
    standby = PostgresCluster(standby_base() / "data", state["standby_port"], password)
    endpoint = moves.RemoteEndpoint(ENDPOINT_CONTROL)
    try:
        endpoint.status()
        if kind == "failover":
            done = moves.failover(endpoint, primary, standby, stale_s=stale_s)
        else:
            done = moves.switchover(endpoint, primary, standby, read_only_s=read_only_s)
    except EndpointUnavailable as exc:
        raise SystemExit(str(exc)) from None
    except RuntimeError as exc:  # pg_ctl, or a standby that did not catch up
        raise SystemExit(f"the {kind} stopped: {str(exc).strip().splitlines()[0]}") from None
    save_state({**state, "serving": "standby", "moved_by": kind})
    print(
        f"{kind}: done in {done.finished - done.started:.1f} s; "
        f"the endpoint serves 127.0.0.1:{standby.port}. `make rotate` rotates on it; "
        "the next `make run` makes a new standby from it"
    )
    return 0


def describe() -> list[str]:
    """Which server the endpoint serves, and the standby's replication, for `make status`."""
    _, state = require_running()
    try:
        endpoint = moves.RemoteEndpoint(ENDPOINT_CONTROL).status()
    except EndpointUnavailable as exc:
        return [f"endpoint    {exc}"]
    target = endpoint.get("target")
    if target is None:
        serves = "refusing connections (mid-failover)"
    else:
        serves = f"127.0.0.1:{target}, {_which(state, target)}"
    return [f"endpoint    127.0.0.1:{endpoint['port']} serves {serves}", f"standby     {_standby(state)}"]


def _which(state: Mapping[str, Any], target: int) -> str:
    if state.get("serving") == "standby" and target == state.get("standby_port"):
        return f"the standby promoted by make {state.get('moved_by', 'failover')}"
    if target == state.get("pg_port"):
        return "the primary"
    return "an unknown server"


def _standby(state: Mapping[str, Any]) -> str:
    if state.get("serving") == "standby":
        return "none: it is the primary now (the next make run makes a new one)"
    if not state.get("standby_port"):
        return "none (REPLICA=0 or SHAPE=master)"
    primary = PostgresCluster(pg_datadir(), state["pg_port"], state["superuser_password"])
    try:
        rows = primary.execute("SELECT state, sync_state FROM pg_stat_replication")
    except Exception as exc:  # psycopg2.Error, or the primary not answering at all
        return f"127.0.0.1:{state['standby_port']} (the primary does not answer: {type(exc).__name__})"
    if not rows:
        return f"127.0.0.1:{state['standby_port']}, not streaming"
    stream, sync = rows[0]
    waits = " (every COMMIT waits for it, as in Multi-AZ)" if sync == "sync" else ""
    return f"127.0.0.1:{state['standby_port']}, {stream}, {sync}{waits}"


def _no_standby(state: Mapping[str, Any]) -> str:
    if state.get("serving") == "standby":
        return (
            f"the standby was already promoted (make {state.get('moved_by', 'failover')}): "
            "restart make run to have a new standby"
        )
    return "the local stack runs without a standby (REPLICA=0 or SHAPE=master): nothing to move to"
