"""The few PostgreSQL protocol (v3) messages a login needs: framing, startup, auth, errors.

Only what the IAM-checking endpoint speaks before it starts relaying bytes untouched; see
"Frontend/Backend Protocol: Message Formats" in PostgreSQL's documentation.
"""

from __future__ import annotations

import asyncio
import struct

PROTOCOL_3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# A startup packet is small (PostgreSQL itself refuses one over 10,000 bytes); a message
# before the session starts is a password or a SCRAM exchange.
_MAX_STARTUP = 10000
_MAX_LOGIN_MESSAGE = 65536


class ProtocolError(Exception):
    """The peer sent something that is not the expected message (no peer data in the text)."""


def message(kind: bytes, body: bytes = b"") -> bytes:
    """One typed message: kind byte, int32 length (itself included), body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def auth_request(code: int, data: bytes = b"") -> bytes:
    """An Authentication* message ('R') with its int32 code."""
    return message(b"R", struct.pack("!I", code) + data)


def startup_message(params: dict[str, str]) -> bytes:
    """A StartupMessage (protocol 3.0) carrying ``params`` (user, database, options...)."""
    body = struct.pack("!I", PROTOCOL_3)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def startup_params(payload: bytes) -> dict[str, str]:
    """The name/value pairs of a StartupMessage's payload (after its protocol code)."""
    fields = payload.split(b"\0")
    if len(fields) < 2 or fields[-1] != b"" or fields[-2] != b"" or len(fields) % 2:
        raise ProtocolError("malformed startup packet")
    pairs = fields[:-2]
    try:
        return {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)}
    except UnicodeDecodeError:
        raise ProtocolError("startup packet is not UTF-8") from None


def error_response(code: str, text: str, severity: str = "FATAL", routine: str | None = None) -> bytes:
    """An ErrorResponse ('E') as a PostgreSQL server words it: severity, SQLSTATE, message."""
    fields = [(b"S", severity), (b"V", severity), (b"C", code), (b"M", text)]
    if routine:
        fields.append((b"R", routine))
    body = b"".join(kind + value.encode() + b"\0" for kind, value in fields) + b"\0"
    return message(b"E", body)


def error_fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse's fields by their one-letter code."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


async def read_startup(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """An untyped startup-phase packet: (request or protocol code, rest of the payload)."""
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    if not 8 <= length <= _MAX_STARTUP:
        raise ProtocolError("invalid length of startup packet")
    payload = await reader.readexactly(length - 4)
    (code,) = struct.unpack("!I", payload[:4])
    return code, payload[4:]


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One typed message during the login: (kind byte, body)."""
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!I", head[1:])
    if not 4 <= length <= _MAX_LOGIN_MESSAGE:
        raise ProtocolError("invalid message length")
    return head[:1], await reader.readexactly(length - 4)
