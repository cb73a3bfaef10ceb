"""A small authoritative DNS server (dnslib) that answers one name and can stall its lookups.

It stands for a VPC resolver that goes slow during a failover: libc's resolver, told by a
``resolv.conf`` to ask it and to wait long enough, waits out every stall. While
``stall()`` is on, each A query for the name is held (a thread of the server waiting on
an Event) for up to ``stall_s`` before it is answered; ``end_stall()`` answers the held
ones at once and stops holding new ones. Every query is recorded, so a test can tell that
a lookup really reached the server and is being held, rather than answered from a cache
or ``/etc/hosts``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

__all__ = ["Query", "StallingDNS"]


@dataclass(frozen=True)
class Query:
    """One query the server received: the name (no trailing dot), its type, and when (monotonic s)."""

    name: str
    qtype: str
    protocol: str
    at: float


class StallingDNS(BaseResolver):  # type: ignore[misc]  # dnslib ships no type hints
    """Answers ``name`` A with ``answer`` and AAAA with no record; NXDOMAIN for any other name.

    UDP and TCP on ``address``:``port`` (libc falls back to TCP for a truncated answer).
    dnslib serves each query in a thread of its own, so a held A query does not hold the
    AAAA query libc sends beside it.
    """

    def __init__(
        self, name: str, address: str, port: int = 53, answer: str = "127.0.0.1", stall_s: float = 8.0
    ):
        self.name = name.rstrip(".")
        self.address = address
        self.port = port
        self.answer = answer
        self.stall_s = stall_s
        self.queries: list[Query] = []
        # Set when the first held query arrives, and when the first held query is answered.
        self.held = threading.Event()
        self.first_answered = threading.Event()
        self.stall_durations: list[float] = []
        self._stalling = False
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._servers: list[DNSServer] = []

    def start(self) -> None:
        """Listen on UDP and TCP; raises OSError when the address or port cannot be bound."""
        for tcp in (False, True):
            server = DNSServer(self, address=self.address, port=self.port, tcp=tcp, logger=DNSLogger("error"))
            server.start_thread()
            self._servers.append(server)

    def stop(self) -> None:
        """Answer anything held, stop serving and close the sockets."""
        self.end_stall()
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers.clear()

    def stall(self) -> None:
        """From now on, hold each A query for the name (up to ``stall_s``) before answering it."""
        with self._lock:
            self._release.clear()
            self._stalling = True

    def end_stall(self) -> None:
        """Answer every held query now; answer new ones at once."""
        with self._lock:
            self._stalling = False
            self._release.set()

    def count(self, qtype: str = "A") -> int:
        """Queries of ``qtype`` for the name received so far."""
        with self._lock:
            return sum(1 for q in self.queries if q.name == self.name and q.qtype == qtype)

    def resolve(self, request: Any, handler: Any) -> Any:
        """dnslib's hook, called in the query's own thread."""
        question = request.q
        name, qtype = str(question.qname).rstrip("."), QTYPE[question.qtype]
        with self._lock:
            self.queries.append(Query(name, qtype, handler.protocol, time.monotonic()))
            hold = self._stalling and name == self.name and qtype == "A"
        reply = request.reply()
        if name != self.name:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if qtype == "A":
            if hold:
                self._hold()
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(self.answer), ttl=0))
        return reply

    def _hold(self) -> None:
        started = time.monotonic()
        self.held.set()
        self._release.wait(self.stall_s)
        with self._lock:
            self.stall_durations.append(time.monotonic() - started)
        self.first_answered.set()
