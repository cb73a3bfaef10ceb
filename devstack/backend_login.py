"""The two ways the IAM-checking endpoint logs in to the real PostgreSQL.

``scram_login`` (IAM mode): the endpoint itself logs in as the token's user with the
password only the stack knows, over SCRAM-SHA-256 computed by ``scramp``.
``relayed_login`` (password mode): the client's own login, the backend's messages and the
client's answers forwarded untouched both ways.

Either ends at the backend's AuthenticationOk; then the endpoint relays the session, the
same way for both. A refused login raises ``Refused`` (its cause, and the ErrorResponse
for the client); no password or proof is ever put in a log line or an error.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import scramp

from devstack import pgwire

__all__ = ["LOGIN_STEP_TIMEOUT_S", "Refused", "relayed_login", "scram_login"]

log = logging.getLogger("devstack.iam_endpoint")

# How long a client or the backend may take over each step of a login; the relayed session
# itself has no timeout (an idle pooled connection may sit for hours).
LOGIN_STEP_TIMEOUT_S = 10.0
# The authentication requests a client answers (with a PasswordMessage or a SASL response):
# cleartext, MD5, SASL and SASL continue. SASL final and Ok expect nothing.
_ANSWERED = frozenset({pgwire.AUTH_CLEARTEXT, pgwire.AUTH_MD5, pgwire.AUTH_SASL, pgwire.AUTH_SASL_CONTINUE})


class Refused(Exception):
    """A login ends here: ``cause`` is counted, ``reply`` (an ErrorResponse) goes to the client."""

    def __init__(self, cause: str, reply: bytes) -> None:
        super().__init__(cause)
        self.cause = cause
        self.reply = reply


async def relayed_login(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    params: dict[str, str],
    client_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
) -> None:
    """Password mode: the backend's own login, relayed untouched, up to its AuthenticationOk.

    Each backend message goes to the client as it came; an authentication request that
    wants an answer (cleartext, MD5, SASL, SASL continue) gets the client's next message,
    forwarded as it came. The endpoint never sees the password in a form it could use:
    with SCRAM only the proof crosses it. A refusal is the backend's own ErrorResponse.
    """
    writer.write(pgwire.startup_message(params))
    while True:
        await writer.drain()
        kind, body = await asyncio.wait_for(pgwire.read_message(reader), LOGIN_STEP_TIMEOUT_S)
        if kind == b"E":
            raise Refused("password", pgwire.message(kind, body))
        client.write(pgwire.message(kind, body))
        if kind != b"R":
            continue  # e.g. NegotiateProtocolVersion: nothing to answer
        (code,) = struct.unpack("!I", body[:4])
        if code == pgwire.AUTH_OK:
            return
        if code in _ANSWERED:
            await client.drain()
            answer, data = await asyncio.wait_for(pgwire.read_message(client_reader), LOGIN_STEP_TIMEOUT_S)
            writer.write(pgwire.message(answer, data))


async def scram_login(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    params: dict[str, str],
    user: str,
    password: str,
) -> None:
    """The backend's side of the login, up to its AuthenticationOk (not forwarded here)."""
    writer.write(pgwire.startup_message(params))
    client: scramp.ScramClient | None = None
    while True:
        await writer.drain()
        kind, body = await asyncio.wait_for(pgwire.read_message(reader), LOGIN_STEP_TIMEOUT_S)
        if kind == b"E":
            # Only severity, SQLSTATE and message go on: PostgreSQL never puts the password
            # in them, and detail or hint fields are not the client's business here.
            fields = pgwire.error_fields(body)
            log.warning("iam endpoint's backend login failed: sqlstate=%s user=%s", fields.get("C"), user)
            reply = pgwire.error_response(
                fields.get("C", "28000"), fields.get("M", ""), fields.get("S", "FATAL")
            )
            raise Refused("backend", reply)
        if kind != b"R":
            raise pgwire.ProtocolError("unexpected message during the backend login")
        (code,) = struct.unpack("!I", body[:4])
        data = body[4:]
        if code == pgwire.AUTH_OK:
            return
        try:
            if code == pgwire.AUTH_SASL and client is None:
                client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
                first = client.get_client_first().encode()
                mechanism = client.mechanism_name.encode() + b"\0"
                writer.write(pgwire.message(b"p", mechanism + struct.pack("!I", len(first)) + first))
            elif code == pgwire.AUTH_SASL_CONTINUE and client is not None:
                client.set_server_first(data.decode())
                writer.write(pgwire.message(b"p", client.get_client_final().encode()))
            elif code == pgwire.AUTH_SASL_FINAL and client is not None:
                client.set_server_final(data.decode())  # proves the server knew the password
            else:
                text = "the endpoint logs in to the database with SCRAM-SHA-256 only"
                raise Refused("backend", pgwire.error_response("28000", text))
        except scramp.ScramException:
            raise Refused("backend", pgwire.error_response("28000", "SCRAM exchange failed")) from None
