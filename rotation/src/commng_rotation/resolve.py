"""Host names resolved cooperatively and within a bound, handed to libpq as ``hostaddr``.

libpq resolves ``host`` with a blocking ``getaddrinfo``, also on the non-blocking connect
path that a wait callback uses: under gevent the whole worker stops while it resolves (the
heartbeat included), and no bound applies to it. A throttled resolver during a failover,
when every request needs a new connection, could get the worker killed by gunicorn's
timeout.

So the name is resolved here first: with ``socket.getaddrinfo``, which is gevent's
resolver once gevent has patched ``socket`` (a greenlet that waits, not a worker that
stops), under the connect's bound. libpq then gets both: ``hostaddr``, the addresses to
connect to, in the resolver's order, and ``host``, repeated for each, for
``verify-full``'s name check. Every new connection resolves again, so a failover's new
address is used as soon as DNS serves it (no cache of ours; the OS or VPC resolver's TTL
applies). A name that does not resolve raises the error libpq would
("could not translate host name"): the outage wait retries it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

import psycopg2

__all__ = ["with_hostaddr"]


def with_hostaddr(params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """``params`` with ``hostaddr`` for a ``host`` that is a name; unchanged otherwise."""
    host = params.get("host")
    if not host or "hostaddr" in params or not _is_name(str(host)):
        return params
    addresses = _resolve(str(host), int(params.get("port") or 5432), timeout_s)
    return {**params, "host": ",".join([host] * len(addresses)), "hostaddr": ",".join(addresses)}


def _is_name(host: str) -> bool:
    """A DNS name: not an address, not a socket directory, not a list libpq walks itself."""
    if host.startswith("/") or "," in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _resolve(host: str, port: int, timeout_s: float) -> list[str]:
    """The addresses of ``host``, in order, without repeats; bounded by ``timeout_s`` under gevent."""
    try:
        with _bound(timeout_s):
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, _Timeout) as exc:
        raise psycopg2.OperationalError("could not translate host name to address") from exc
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise psycopg2.OperationalError("could not translate host name to address")
    return addresses


class _Timeout(Exception):
    """The lookup outlived its bound."""


def _bound(timeout_s: float) -> Any:
    """A gevent Timeout once gevent patched ``socket`` (the lookup is a greenlet's wait); else
    nothing: a plain thread's lookup blocks only that thread, bounded by the OS resolver."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        from gevent import Timeout

        return Timeout(timeout_s, _Timeout)
    from contextlib import nullcontext

    return nullcontext()
