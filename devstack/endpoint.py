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

_CHUNK = 256 * 1024


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
        self._sessions: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
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
        self._server = await asyncio.start_server(self._relay, self.host, self.port, reuse_address=True)
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
        # Closing both ends of each relayed connection ends its pipes (cancelling the tasks
        # instead would make asyncio's stream callback log the CancelledError).
        for writer in list(self._writers):
            writer.close()
        if self._sessions:
            await asyncio.wait(self._sessions, timeout=5)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        self._writers.add(client_writer)
        try:
            target = self._target
            if target is None:  # the listener closed while this connection was being accepted
                return
            try:
                server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                return  # the server is gone: the client sees its connection closed, as with RDS
            self._writers.add(server_writer)
            self.relayed += 1
            _no_delay(client_writer)
            _no_delay(server_writer)
            try:
                await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
            finally:
                server_writer.close()
                self._writers.discard(server_writer)
        finally:
            client_writer.close()
            self._writers.discard(client_writer)
            self._sessions.discard(task)

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


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or a reset on either side, then close ``writer`` so its peer sees the end."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
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
