"""RDS's IAM database authentication, locally: an endpoint that checks tokens, then relays.

The service logs in with a token instead of a password when ``DB_AUTH=iam``. Nothing local
checks such a token, so this endpoint does what RDS does in front of PostgreSQL:

1. It answers the client's SSLRequest with 'S' and wraps the connection in TLS with the
   certificate it is given. A client that does not ask for TLS is refused with the
   ``no pg_hba.conf entry ... no encryption`` error (SQLSTATE 28000) RDS gives it.
2. It reads the StartupMessage, asks for a cleartext password (safe: it is inside TLS) and
   checks the token (``devstack.iam_token``: host, port, user, region, access key, age and
   botocore's SigV4 signature). A refusal is ``FATAL 28000 PAM authentication failed for
   user "<user>"``, RDS's words, and the connection is closed. The token is never logged.
3. It logs in to the real PostgreSQL (``backend()``, asked per connection, so a test or a
   failover can move it) as the same user with the password only the stack knows, over
   SCRAM-SHA-256 computed by ``scramp``, passing the client's startup parameters on
   (``devstack.backend_login`` holds both ways of logging in to the backend).
4. It sends the client AuthenticationOk and then relays bytes both ways untouched
   (ParameterStatus, BackendKeyData, ReadyForQuery and the whole session) until either
   side closes. A session outlives its token, as on RDS: the token is checked once.

With ``check_tokens=False`` (password mode) it checks nothing itself: after TLS and the
StartupMessage it forwards the client's startup to ``backend()`` and relays the backend's
own authentication exchange (SCRAM, or a refusal) message by message, untouched both ways,
then relays the session exactly as in IAM mode. The bench runs the service through it in
both modes, so that the local endpoint's cost (TLS termination, one asyncio thread) lands on
the IAM login and on its password twin alike, and only the login differs.

A CancelRequest is relayed to ``backend()`` as is: the client holds the real backend's key
(BackendKeyData is forwarded untouched), and PostgreSQL answers a cancel with nothing.

All sessions run on one asyncio loop in a thread of its own, so the endpoint can live in a
test process or beside ``make run``'s other servers. ``refusals`` counts refused logins by
cause (the causes of ``iam_token.refusal``, plus ``no_tls``, ``protocol``, ``backend`` and,
in password mode, ``password``: the backend refused the client's own login); ``connects``
counts completed logins (new backend sessions) in either mode.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from devstack import pgwire
from devstack.backend_login import LOGIN_STEP_TIMEOUT_S, Refused, relayed_login, scram_login
from devstack.iam_token import TokenPolicy, refusal

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 2.0
_CHUNK = 65536


def _pam_failed(user: str) -> bytes:
    # What RDS sends for any token it refuses (its IAM login is a PAM module in PostgreSQL).
    return pgwire.error_response(
        "28000", f'PAM authentication failed for user "{user}"', routine="auth_failed"
    )


class IamEndpoint:
    """A PostgreSQL endpoint that takes RDS IAM tokens and relays to a password-protected server."""

    def __init__(
        self,
        *,
        backend: Callable[[], tuple[str, int]],
        logins: Mapping[str, str] | None = None,
        hostname: str,
        region: str,
        access_key: str,
        secret_key: str,
        certfile: Path,
        keyfile: Path,
        token_lifetime_s: float = 900.0,
        skew_s: float = 60.0,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        check_tokens: bool = True,
    ) -> None:
        """``clock`` (wall-clock seconds) lets a test age tokens without waiting.

        ``logins`` (user -> the backend password only the stack knows) is what IAM mode logs
        in with; password mode (``check_tokens=False``) needs none: the client brings its own.
        """
        self._backend = backend
        self._logins = dict(logins or {})
        self.check_tokens = check_tokens
        self._hostname = hostname
        self._region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._lifetime_s = token_lifetime_s
        self._skew_s = skew_s
        self._listen_host = listen_host
        self._clock = clock
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls.load_cert_chain(certfile, keyfile)
        self.port = port
        self.refusals: dict[str, int] = {}
        self.connects = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    # -- lifecycle (called from any thread) ---------------------------------------------

    def start(self) -> None:
        """Listen on ``listen_host:port`` (``port`` is set when 0 was asked); a second call does nothing."""
        with self._lock:
            if self._thread is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="iam-endpoint", daemon=True)
            thread.start()
            try:
                future = asyncio.run_coroutine_threadsafe(self._listen(), loop)
                future.result(_STOP_TIMEOUT_S)
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._loop, self._thread = loop, thread

    def stop(self) -> None:
        """Stop listening, end every session (client and backend side) and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(_STOP_TIMEOUT_S)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                self._loop = self._thread = self._server = None

    def __enter__(self) -> IamEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._session, self._listen_host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    # -- one client connection ------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        writers = [writer]  # what must be closed when the session ends: client, then backend
        abort = False
        try:
            backend = await self._login(reader, writer, writers)
            if backend is not None:
                self.connects += 1
                await self._relay(reader, writer, *backend)
        except Refused as refused:
            self.refusals[refused.cause] = self.refusals.get(refused.cause, 0) + 1
            writer.write(refused.reply)
        except (OSError, EOFError, TimeoutError, ssl.SSLError, pgwire.ProtocolError):
            pass  # the peer went away or spoke nonsense: nobody is left to tell
        except asyncio.CancelledError:
            # stop() cancelled it. Not re-raised: asyncio's stream callback would report a
            # cancelled connection task as an error in the log.
            abort = True
        finally:
            await asyncio.gather(*(_shut(each, abort) for each in writers))
            self._sessions.discard(task)

    async def _login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, writers: list[asyncio.StreamWriter]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The client's startup and token, then the backend's login; None for a cancel request."""
        encrypted = False
        while True:
            code, payload = await asyncio.wait_for(pgwire.read_startup(reader), LOGIN_STEP_TIMEOUT_S)
            if code == pgwire.SSL_REQUEST and not encrypted:
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self._tls, ssl_handshake_timeout=LOGIN_STEP_TIMEOUT_S)
                encrypted = True
            elif code == pgwire.GSSENC_REQUEST and not encrypted:
                writer.write(b"N")  # no GSSAPI here: libpq then asks for TLS
            elif code == pgwire.CANCEL_REQUEST:
                await self._relay_cancel(payload)
                return None
            elif code == pgwire.PROTOCOL_3:
                break
            else:
                raise Refused("protocol", pgwire.error_response("0A000", "unsupported frontend protocol"))
        params = pgwire.startup_params(payload)
        user = params.get("user", "")
        if not encrypted:
            host = writer.get_extra_info("peername")[0]
            database = params.get("database", user)
            text = (
                f'no pg_hba.conf entry for host "{host}", user "{user}", database "{database}", no encryption'
            )
            raise Refused("no_tls", pgwire.error_response("28000", text, routine="ClientAuthentication"))
        if not self.check_tokens:
            backend = await self._open_backend(writers)
            await relayed_login(*backend, params, reader, writer)
            return backend
        writer.write(pgwire.auth_request(pgwire.AUTH_CLEARTEXT))
        await writer.drain()
        kind, body = await asyncio.wait_for(pgwire.read_message(reader), LOGIN_STEP_TIMEOUT_S)
        if kind != b"p":
            raise Refused("protocol", pgwire.error_response("08P01", "expected password response"))
        cause = self._check(body, user)
        if cause is not None:
            log.warning("iam endpoint refused a login: cause=%s user=%s", cause, user)
            raise Refused(cause, _pam_failed(user))
        return await self._backend_login(params, user, writer, writers)

    def _check(self, body: bytes, user: str) -> str | None:
        """The refusal cause for the PasswordMessage ``body`` as ``user``'s token, or None."""
        token = body[:-1].decode("utf-8", "replace") if body.endswith(b"\0") else ""
        policy = TokenPolicy(
            self._hostname,
            self.port,
            self._region,
            self._access_key,
            self._secret_key,
            self._lifetime_s,
            self._skew_s,
        )
        cause = refusal(token, user, policy, self._clock())
        if cause is None and user not in self._logins:
            return "user"  # a good token, but a login RDS would not know (no rds_iam grant)
        return cause

    async def _backend_login(
        self,
        params: dict[str, str],
        user: str,
        client: asyncio.StreamWriter,
        writers: list[asyncio.StreamWriter],
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Log in to ``backend()`` as ``user`` with SCRAM-SHA-256; AuthenticationOk goes to the client."""
        reader, writer = await self._open_backend(writers)
        await scram_login(reader, writer, params, user, self._logins[user])
        client.write(pgwire.auth_request(pgwire.AUTH_OK))
        return reader, writer

    async def _open_backend(
        self, writers: list[asyncio.StreamWriter]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self._backend()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), LOGIN_STEP_TIMEOUT_S)
        except (OSError, TimeoutError):
            log.warning("iam endpoint could not reach the database at %s:%s", host, port)
            # Closed without a word, as a client of RDS sees an instance that is down or
            # failing over: a connection that ends, which it may retry (an error message
            # here would read as a refused login).
            raise Refused("backend", b"") from None
        writers.append(writer)
        return reader, writer

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        backend_reader: asyncio.StreamReader,
        backend_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy bytes both ways until either side closes; then both are closed."""
        pipes = [
            asyncio.create_task(_pipe(client_reader, backend_writer)),
            asyncio.create_task(_pipe(backend_reader, client_writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _relay_cancel(self, payload: bytes) -> None:
        host, port = self._backend()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), LOGIN_STEP_TIMEOUT_S)
        except (OSError, TimeoutError):
            return
        body = struct.pack("!I", pgwire.CANCEL_REQUEST) + payload
        writer.write(struct.pack("!I", len(body) + 4) + body)
        await _shut(writer)


async def _shut(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    """Close ``writer`` (flushing what it holds unless ``abort``) and wait until its socket is closed.

    Waiting matters: a transport whose loop stops before its close completes keeps its
    socket open until garbage collection. A TLS peer that does not answer the close (its
    close_notify) within ``_CLOSE_TIMEOUT_S`` is cut off.
    """
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_S)
    except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
        # Also when stop() cancels a session that was still closing: the socket is closed
        # all the same (abort's callback runs before this task's next step), and the
        # session ends without re-raising, which stop() does not need.
        writer.transport.abort()
        await asyncio.sleep(0)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Forward what ``reader`` receives to ``writer`` until end of stream or an error."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
