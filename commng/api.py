"""The CommNG messaging API: channels and messages, JSON in and out.

Every input is checked here before anything reaches PostgreSQL, so that no input ends
in a 500: the body is parsed by ``_json_object`` (UTF-8 only, nesting bounded, no NaN or
Infinity), strings that PostgreSQL's text cannot hold (NUL, unpaired surrogates) are
refused naming the field, and numbers in the query string and the path are ASCII digits.
"""

from __future__ import annotations

import json
import re
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, request
from sqlalchemy.exc import IntegrityError
from werkzeug.routing import IntegerConverter

from commng import idempotency
from commng.db import db, from_replica, reading, retry_on_disconnect
from commng.errors import APIError
from commng.models import Channel, Message, now
from commng_rotation import witness

__all__ = ["MAX_JSON_DEPTH", "bp", "init_app"]

bp = Blueprint("api", __name__, url_prefix="/api")

NAME_RE = re.compile(r"[a-z0-9-]{1,64}")
MAX_BODY = 4000
MAX_ID = 2**63 - 1  # PostgreSQL bigint
FOREIGN_KEY_VIOLATION = "23503"  # SQLSTATE
DEFAULT_LIMIT = 50
MAX_LIMIT = 100
# Our bodies are one flat object; the bound keeps the parser's recursion far from the
# interpreter's limit (a RecursionError is still caught, should the scan below miss).
MAX_JSON_DEPTH = 32

# JSON travels as UTF-8: a charset parameter, when sent, must say UTF-8.
_UTF8_CHARSETS = frozenset({"utf-8", "utf8"})
# str.isdigit() and int() also take superscript, Arabic-Indic and fullwidth digits:
# query numbers are ASCII only.
_ASCII_INT = re.compile(r"[0-9]{1,19}")
# The nesting scan: outside strings it stops at a quote or a bracket; from an opening
# quote it skips the rest of the string literal at once (possessive: no backtracking).
_QUOTE_OR_BRACKET = re.compile(r'["\[\]{}]')
_REST_OF_STRING = re.compile(r'(?:[^"\\]++|\\.)*+"', re.DOTALL)
# What PostgreSQL's text cannot store (NUL) and what UTF-8 cannot encode (lone surrogates).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


class _NonFiniteNumber(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON has no such numbers."""


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(name)


def _too_deep(text: str) -> bool:
    """Whether arrays and objects nest more than MAX_JSON_DEPTH deep in ``text``.

    In time linear in the body whatever it holds; brackets inside strings do not count.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False  # every body the API expects
    depth = position = 0
    while (found := _QUOTE_OR_BRACKET.search(text, position)) is not None:
        char, position = found.group(), found.end()
        if char == '"':
            rest = _REST_OF_STRING.match(text, position)
            if rest is None:
                return False  # an unterminated string: json.loads refuses the body
            position = rest.end()
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _decoded_body() -> str:
    """The request body as text: JSON media type, a UTF-8 charset if any, valid UTF-8."""
    if not request.is_json:
        raise APIError(415, "unsupported_media_type", "send Content-Type: application/json")
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.strip().lower() not in _UTF8_CHARSETS:
        raise APIError(
            415,
            "unsupported_charset",
            "JSON bodies must be UTF-8: send Content-Type: application/json with no charset or charset=utf-8",
        )
    try:
        return request.get_data(cache=True).decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"the request body is not valid UTF-8 (byte {exc.start})"
        raise APIError(400, "invalid_encoding", message) from None


def _json_object(allowed: set[str]) -> dict[str, Any]:
    """The request's JSON object, with only ``allowed`` keys; 415/400/422 otherwise."""
    text = _decoded_body()
    if _too_deep(text):
        raise APIError(400, "invalid_json", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except _NonFiniteNumber as exc:
        raise APIError(400, "invalid_json", f"{exc} is not a JSON number") from None
    except json.JSONDecodeError as exc:
        message = f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise APIError(400, "invalid_json", message) from None
    except RecursionError:
        raise APIError(400, "invalid_json", "the JSON body nests too deeply") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise APIError(400, "invalid_json", "a number in the JSON body has too many digits") from None
    if not isinstance(data, dict):
        raise APIError(422, "invalid_body", "the JSON body must be an object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise APIError(422, "unknown_fields", f"unknown fields: {', '.join(unknown)[:200]}")
    return data


def _text_field(data: dict[str, Any], field: str, code: str, rule: str) -> str:
    """``data[field]`` when it is a string PostgreSQL can store; 422 ``code`` (saying ``rule``) if not."""
    value = data.get(field)
    if not isinstance(value, str):
        raise APIError(422, code, f"{field} must be {rule}")
    if _UNSTORABLE.search(value):
        raise APIError(422, code, f"{field} must not contain NUL characters (U+0000) or unpaired surrogates")
    return value


def _int_param(name: str, low: int, high: int) -> int | None:
    """Query parameter ``name`` as an integer from ``low`` to ``high``; None when absent or empty."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not _ASCII_INT.fullmatch(raw) or not low <= int(raw) <= high:
        raise APIError(400, "invalid_parameter", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _limit() -> int:
    limit = _int_param("limit", 1, MAX_LIMIT)
    return DEFAULT_LIMIT if limit is None else limit


class AsciiIntegerConverter(IntegerConverter):
    """``<int:...>`` with ASCII digits only (werkzeug's ``\\d+`` also matches other scripts' digits)."""

    regex = r"[0-9]+"


def _get_or_404(model: type[Channel] | type[Message], ident: int, session: Any = None) -> Any:
    """The row, or 404. Read from a replica, a row it does not have yet is asked of the primary."""
    reader = db.session if session is None else session
    found = reader.get(model, ident) if 0 < ident <= MAX_ID else None
    if found is None and session is not None and from_replica(session):
        found = db.session.get(model, ident)  # written a moment ago: not replayed yet
    if found is None:
        raise APIError(404, "not_found", f"{model.__tablename__[:-1]} {ident} does not exist")
    return found


@bp.post("/channels")
@retry_on_disconnect
def create_channel() -> Any:
    """Create a channel; 409 when the name is taken."""
    data = _json_object({"name"})
    name = _text_field(data, "name", "invalid_name", "a string matching [a-z0-9-]{1,64}")
    if not NAME_RE.fullmatch(name):
        raise APIError(422, "invalid_name", "name must match [a-z0-9-]{1,64}")
    key = idempotency.request_key()
    try:
        if key is not None:
            return idempotency.create_once(
                key, "channel", _CREATE_CHANNEL, {"name": name, "created_at": now()}, _channel, _load_channel
            )
        channel = Channel(name=name)
        db.session.add(channel)
        db.session.flush()  # the INSERT, which the commit would send anyway: the id is known
        witness(db.session, _CHANNEL_WITNESS, {"id": channel.id, "name": name})
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise APIError(409, "channel_exists", f"a channel named {name!r} exists") from None
    return channel.as_dict(), 201


# What proves a create committed when a failover cut its COMMIT (commng_rotation.witness): the
# row by its id and content, on the writer that continues the history.
_CHANNEL_WITNESS = "SELECT 1 FROM channels WHERE id = %(id)s AND name = %(name)s"
_MESSAGE_WITNESS = (
    "SELECT 1 FROM messages WHERE id = %(id)s AND channel_id = %(channel_id)s AND body = %(body)s"
)

# With an Idempotency-Key: the key and the row in one message (commng/idempotency.py).
_CREATE_CHANNEL = idempotency.claim_sql(
    "INSERT INTO channels (name, created_at) SELECT :name, :created_at", "id, name, created_at"
)
_CREATE_MESSAGE = idempotency.claim_sql(
    "INSERT INTO messages (channel_id, body, created_at) SELECT :channel_id, :body, :created_at",
    "id, channel_id, body, created_at",
)


def _channel(row: Any) -> dict[str, Any]:
    return Channel(**row).as_dict()


def _message(row: Any) -> dict[str, Any]:
    return Message(**row).as_dict()


def _load_channel(ident: int) -> dict[str, Any] | None:
    found = db.session.get(Channel, ident)
    return None if found is None else found.as_dict()


def _load_message(ident: int) -> dict[str, Any] | None:
    found = db.session.get(Message, ident)
    return None if found is None else found.as_dict()


def _page(session: Any, query: sa.Select[Any], limit: int) -> tuple[list[Any], Any]:
    """At most ``limit`` rows of ``query``, and the cursor of the next page (None: there is none)."""
    rows = list(session.scalars(query.limit(limit + 1)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1].id if more else None


@bp.get("/channels")
@retry_on_disconnect
def list_channels() -> Any:
    """Channels, oldest first, paged forward by ``after_id`` (the last id of the previous page)."""
    limit = _limit()
    after_id = _int_param("after_id", 1, MAX_ID)
    query = sa.select(Channel)
    if after_id is not None:
        query = query.where(Channel.id > after_id)
    with reading() as session:
        channels, next_after_id = _page(session, query.order_by(Channel.id), limit)
        return {"channels": [c.as_dict() for c in channels], "next_after_id": next_after_id}


@bp.post("/channels/<int:channel_id>/messages")
@retry_on_disconnect
def post_message(channel_id: int) -> Any:
    """Post a message to a channel."""
    data = _json_object({"body"})
    rule = f"a non-empty string of at most {MAX_BODY} characters"
    body = _text_field(data, "body", "invalid_body", rule)
    if not body.strip() or len(body) > MAX_BODY:
        raise APIError(422, "invalid_body", f"body must be {rule}")
    if not 0 < channel_id <= MAX_ID:
        raise _channel_not_found(channel_id)
    # The foreign key checks that the channel exists, in the INSERT itself: no SELECT first.
    key = idempotency.request_key()
    try:
        if key is not None:
            values = {"channel_id": channel_id, "body": body, "created_at": now()}
            return idempotency.create_once(key, "message", _CREATE_MESSAGE, values, _message, _load_message)
        message = Message(channel_id=channel_id, body=body)
        db.session.add(message)
        db.session.flush()
        witness(db.session, _MESSAGE_WITNESS, {"id": message.id, "channel_id": channel_id, "body": body})
        db.session.commit()
    except IntegrityError as exc:
        db.session.rollback()
        if getattr(exc.orig, "pgcode", None) == FOREIGN_KEY_VIOLATION:
            raise _channel_not_found(channel_id) from None
        raise
    return message.as_dict(), 201


def _channel_not_found(channel_id: int) -> APIError:
    return APIError(404, "not_found", f"channel {channel_id} does not exist")


@bp.get("/channels/<int:channel_id>/messages")
@retry_on_disconnect
def list_messages(channel_id: int) -> Any:
    """Messages of a channel, newest first, paged back by ``before_id`` (the last id of the previous page)."""
    limit = _limit()
    before_id = _int_param("before_id", 1, MAX_ID)
    if not 0 < channel_id <= MAX_ID:
        raise _channel_not_found(channel_id)
    with reading() as session:
        query = sa.select(Message).where(Message.channel_id == channel_id)
        if before_id is not None:
            query = query.where(Message.id < before_id)
        messages, next_before_id = _page(session, query.order_by(Message.id.desc()), limit)
        if not messages:  # no such channel, or none (left) in it: only then look the channel up
            _get_or_404(Channel, channel_id, session)
        return {"messages": [m.as_dict() for m in messages], "next_before_id": next_before_id}


@bp.get("/messages/<int:message_id>")
@retry_on_disconnect
def get_message(message_id: int) -> Any:
    """One message."""
    with reading() as session:
        return _get_or_404(Message, message_id, session).as_dict()


def init_app(app: Flask) -> None:
    """Register the API blueprint, its ids read as ASCII digits only."""
    # Rules compile their converters when registered: set ours before the blueprint.
    # The rule text (and so the metrics' route label) stays "<int:...>".
    app.url_map.converters["int"] = AsciiIntegerConverter
    app.register_blueprint(bp)
