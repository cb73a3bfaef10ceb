"""The CommNG messaging API: channels and messages, JSON in and out."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, request
from sqlalchemy.exc import IntegrityError

from commng.db import db, retry_on_disconnect
from commng.errors import APIError
from commng.models import Channel, Message

__all__ = ["bp", "init_app"]

bp = Blueprint("api", __name__, url_prefix="/api")

NAME_RE = re.compile(r"[a-z0-9-]{1,64}")
MAX_BODY = 4000
MAX_ID = 2**63 - 1  # PostgreSQL bigint
DEFAULT_LIMIT = 50
MAX_LIMIT = 100


def _json_object(allowed: set[str]) -> dict[str, Any]:
    """The request's JSON object, with only ``allowed`` keys; 415/400/422 otherwise."""
    if not request.is_json:
        raise APIError(415, "unsupported_media_type", "send Content-Type: application/json")
    data = request.get_json(silent=True)
    if data is None:
        raise APIError(400, "invalid_json", "the request body is not valid JSON")
    if not isinstance(data, dict):
        raise APIError(422, "invalid_body", "the JSON body must be an object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise APIError(422, "unknown_fields", f"unknown fields: {', '.join(unknown)[:200]}")
    return data


def _int_param(name: str, low: int, high: int) -> int | None:
    """Query parameter ``name`` as an integer from ``low`` to ``high``; None when absent or empty."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 19 or not low <= int(raw) <= high:
        raise APIError(400, "invalid_parameter", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _limit() -> int:
    limit = _int_param("limit", 1, MAX_LIMIT)
    return DEFAULT_LIMIT if limit is None else limit


def _get_or_404(model: type[Channel] | type[Message], ident: int) -> Any:
    found = db.session.get(model, ident) if 0 < ident <= MAX_ID else None
    if found is None:
        raise APIError(404, "not_found", f"{model.__tablename__[:-1]} {ident} does not exist")
    return found


@bp.post("/channels")
@retry_on_disconnect
def create_channel() -> Any:
    """Create a channel; 409 when the name is taken."""
    data = _json_object({"name"})
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise APIError(422, "invalid_name", "name must match [a-z0-9-]{1,64}")
    channel = Channel(name=name)
    db.session.add(channel)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise APIError(409, "channel_exists", f"a channel named {name!r} exists") from None
    return channel.as_dict(), 201


def _page(query: sa.Select[Any], limit: int) -> tuple[list[Any], Any]:
    """At most ``limit`` rows of ``query``, and the cursor of the next page (None: there is none)."""
    rows = list(db.session.scalars(query.limit(limit + 1)).all())
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
    channels, next_after_id = _page(query.order_by(Channel.id), limit)
    return {"channels": [c.as_dict() for c in channels], "next_after_id": next_after_id}


@bp.post("/channels/<int:channel_id>/messages")
@retry_on_disconnect
def post_message(channel_id: int) -> Any:
    """Post a message to a channel."""
    data = _json_object({"body"})
    body = data.get("body")
    if not isinstance(body, str) or not body.strip() or len(body) > MAX_BODY:
        raise APIError(
            422, "invalid_body", f"body must be a non-empty string of at most {MAX_BODY} characters"
        )
    channel = _get_or_404(Channel, channel_id)
    message = Message(channel_id=channel.id, body=body)
    db.session.add(message)
    db.session.commit()
    return message.as_dict(), 201


@bp.get("/channels/<int:channel_id>/messages")
@retry_on_disconnect
def list_messages(channel_id: int) -> Any:
    """Messages of a channel, newest first, paged back by ``before_id`` (the last id of the previous page)."""
    limit = _limit()
    before_id = _int_param("before_id", 1, MAX_ID)
    channel = _get_or_404(Channel, channel_id)
    query = sa.select(Message).where(Message.channel_id == channel.id)
    if before_id is not None:
        query = query.where(Message.id < before_id)
    messages, next_before_id = _page(query.order_by(Message.id.desc()), limit)
    return {"messages": [m.as_dict() for m in messages], "next_before_id": next_before_id}


@bp.get("/messages/<int:message_id>")
@retry_on_disconnect
def get_message(message_id: int) -> Any:
    """One message."""
    return _get_or_404(Message, message_id).as_dict()


def init_app(app: Flask) -> None:
    """Register the API blueprint."""
    app.register_blueprint(bp)
