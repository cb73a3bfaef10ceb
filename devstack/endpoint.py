"""A TCP endpoint that stands for the RDS endpoint's DNS name: an address that can move.

On RDS the service connects to a name (``mydb.xxxx.rds.amazonaws.com``) that a failover or a
Blue/Green switchover repoints at another server. Locally the name is this relay on
127.0.0.1: every connection made to it is relayed to the server it points at *now*, so the
stack can move the endpoint the way RDS moves the name:

- ``point_at(port)``: new connections go to that server; relayed ones stay where they are
  (a DNS change does not move an open TCP connection either).
- ``refuse()``: stop listening, so a connect is refused, as when the name still points at a
  host that died (the 5-s TTL of a failover, or longer).

The relay copies bytes both ways and nothing else: TLS, authentication and the protocol are
the two ends' business. It runs an asyncio loop in a thread of its own, so a test, the bench
or ``make run`` can hold one in-process. ``make failover`` and ``make switchover`` run in
another process and steer the one ``make run`` holds through a control socket
(``serve_control``, ``send_control``): one JSON line in, one JSON line out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

__all__ = ["Endpoint", "EndpointUnavailable", "send_control"]


class EndpointUnavailable(RuntimeError):
    """The running stack's endpoint did not answer on its control socket."""


class Endpoint:
    """A relay on ``host``:``port`` to the server on 127.0.0.1:``target`` (None: refusing)."""

    def __init__(self, target: int | None, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="endpoint", daemon=True)
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()  # both ends of every relayed connection
        self.relayed = 0  # connections relayed since start, for `make status` and the tests

    # -- life ---------------------------------------------------------------------------

    def start(self) -> Endpoint:
        """Listening (unless refusing) when it returns."""
        self._thread.start()
        if self._target is None:
            self.port = self.port or _free_port(self.host)
        else:
            self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the listener, the control socket and every relayed connection."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- moves ----------------------------------------------------------------------------

    @property
    def target(self) -> int | None:
        """The port of the server new connections go to, or None while refusing."""
        return self._target

    def point_at(self, target: int) -> None:
        """New connections go to 127.0.0.1:``target``; listening again if it was refusing."""
        self._call(self._point_at(target))

    def refuse(self) -> None:
        """Stop listening: a connect is refused until ``point_at``. Relayed connections stay."""
        self._call(self._refuse())

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "target": self._target, "relayed": self.relayed}

    # -- control socket (make failover / switchover / status, from another process) ---------

    def serve_control(self, path: Path) -> None:
        """Accept ``{"op": "status" | "refuse" | "point_at", "target": port}`` lines on ``path``."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._call(self._serve_control(str(path)))
        os.chmod(path, 0o600)

    # -- the loop's side --------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await self._loop.create_server(
            lambda: _Client(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _point_at(self, target: int) -> None:
        self._target = target
        if self._server is None:
            await self._listen()

    async def _refuse(self) -> None:
        self._target = None
        if self._server is not None:
            # close() stops listening at once; wait_closed() would also wait (3.12+) for the
            # relayed connections, which a DNS change leaves open.
            self._server.close()
            self._server = None

    async def _shutdown(self) -> None:
        await self._refuse()
        if self._control is not None:
            self._control.close()
        for transport in list(self._transports):
            transport.close()

    async def _serve_control(self, path: str) -> None:
        self._control = await asyncio.start_unix_server(self._command, path)

    async def _command(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            op = request.get("op")
            if op == "refuse":
                await self._refuse()
            elif op == "point_at":
                await self._point_at(int(request["target"]))
            elif op != "status":
                raise ValueError(f"unknown op {op!r}")
            reply: dict[str, Any] = {"ok": True, **self.status()}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            reply = {"ok": False, "error": str(exc)}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


class _Half(asyncio.Protocol):
    """One end of a relayed connection: what it receives goes out on the other end.

    Protocols rather than streams: the bytes go from one transport's callback straight to
    the other's write, with no task switch in between. Flow control: when the other end's
    buffer is full, this end stops reading until it drains.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.endpoint._transports.add(transport)
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.endpoint._transports.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # whatever it still buffers is sent first

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    """The end a client connected to: it opens the other end, to the server pointed at now."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        target = self.endpoint.target
        if target is None:  # the listener closed while this connection was being accepted
            self.transport.close()
            return
        self.transport.pause_reading()  # until the server end is open
        self.opening = asyncio.ensure_future(self._open(target))  # kept: the loop holds tasks weakly

    async def _open(self, target: int) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(lambda: _Half(self.endpoint), "127.0.0.1", target)
        except OSError:
            self.transport.close()  # the server is gone: the client sees its connection closed
            return
        if self.transport.is_closing():
            assert server.transport is not None
            server.transport.close()
            return
        self.peer, server.peer = server, self
        self.endpoint.relayed += 1
        self.transport.resume_reading()


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def send_control(path: Path, op: str, target: int | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """One command to the endpoint of the running stack; its reply, or EndpointUnavailable."""
    request: dict[str, Any] = {"op": op, **({"target": target} if target is not None else {})}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply: dict[str, Any] = json.loads(sock.makefile().readline() or "{}")
    except (OSError, ValueError) as exc:
        raise EndpointUnavailable(f"the local stack's endpoint ({path}) does not answer: {exc}") from None
    if not reply.get("ok"):
        raise EndpointUnavailable(f"the endpoint refused {op}: {reply.get('error', 'no reply')}")
    return reply
