"""The yardstick: CommNG's routes and schema on a bare Flask-SQLAlchemy port.

Not a product. Static credentials, one engine (pool from ``POSTGRES_POOL_SIZE``, pre-ping
on), gevent with a plain cooperative psycopg2 wait callback (what psycogreen installs),
and none of the service's per-request machinery: no rotation layer, no retry, no request
ids, no metrics, no JSON errors beyond what the routes need. ``bench/baseline_wsgi.py``
serves it with the project's gunicorn.conf.py (the access log switched off there).

The answers have the same shape and status codes as the service's for every request
the bench makes, so the load generator cannot tell them apart.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from gevent.socket import wait_read, wait_write
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Channel", "Message", "create_app", "db", "gevent_wait_callback"]

# The key the rotation layer's gunicorn hooks look for (post_worker_init, worker_exit).
_HOOKS_EXTENSION = "commng_rotation"
log = logging.getLogger("bench.baseline")


class _Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=_Base, session_options={"expire_on_commit": False})


def _now() -> datetime:
    return datetime.now(UTC)


class Channel(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at.isoformat()}


class Message(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    channel_id: Mapped[int] = mapped_column(sa.BigInteger, sa.ForeignKey("channels.id"), nullable=False)
    body: Mapped[str] = mapped_column(sa.Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel_id": self.channel_id,
            "body": self.body,
            "created_at": self.created_at.isoformat(),
        }


def gevent_wait_callback(conn: Any) -> None:
    """psycogreen's callback: wait on the socket cooperatively, no deadline."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            wait_read(conn.fileno())
        elif state == psycopg2.extensions.POLL_WRITE:
            wait_write(conn.fileno())
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"bad poll state {state}")


class _Hooks:
    """What gunicorn.conf.py's post_worker_init / worker_exit call; logs what the bench waits for."""

    def start(self) -> None:
        log.info("secret_watcher_disabled")
        log.info("worker_ready")

    def stop(self) -> None:
        db.engine.dispose()


def _url() -> sa.URL:
    env = os.environ
    return sa.URL.create(
        "postgresql+psycopg2",
        username=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        host=env.get("POSTGRES_HOST", "127.0.0.1"),
        port=int(env.get("POSTGRES_PORT", "5432")),
        database=env["POSTGRES_DB"],
    )


def _limit() -> int:
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        abort(400)
    return int(raw)


def create_app() -> Flask:
    """The bare port: routes of commng/api.py and commng/health.py, nothing else."""
    psycopg2.extensions.set_wait_callback(gevent_wait_callback)
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=_url(),
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": int(os.environ.get("POSTGRES_POOL_SIZE", "5")),
            "max_overflow": int(os.environ.get("POSTGRES_MAX_OVERFLOW", "0")),
            "pool_pre_ping": True,
        },
    )
    db.init_app(app)
    app.extensions[_HOOKS_EXTENSION] = _Hooks()

    @app.get("/healthz")
    def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Any:
        db.session.execute(sa.text("SELECT 1"))
        return {"status": "ready"}

    @app.post("/api/channels")
    def create_channel() -> Any:
        channel = Channel(name=(request.get_json() or {})["name"])
        db.session.add(channel)
        db.session.commit()
        return channel.as_dict(), 201

    @app.get("/api/channels")
    def list_channels() -> Any:
        channels = db.session.scalars(sa.select(Channel).order_by(Channel.id)).all()
        return {"channels": [c.as_dict() for c in channels]}

    @app.post("/api/channels/<int:channel_id>/messages")
    def post_message(channel_id: int) -> Any:
        channel = db.get_or_404(Channel, channel_id)
        message = Message(channel_id=channel.id, body=(request.get_json() or {})["body"])
        db.session.add(message)
        db.session.commit()
        return message.as_dict(), 201

    @app.get("/api/channels/<int:channel_id>/messages")
    def list_messages(channel_id: int) -> Any:
        limit = _limit()
        channel = db.get_or_404(Channel, channel_id)
        query = sa.select(Message).where(Message.channel_id == channel.id)
        if request.args.get("before_id", "").isdigit():
            query = query.where(Message.id < int(request.args["before_id"]))
        rows = db.session.scalars(query.order_by(Message.id.desc()).limit(limit)).all()
        next_before_id = rows[-1].id if len(rows) == limit else None
        return {"messages": [m.as_dict() for m in rows], "next_before_id": next_before_id}

    @app.get("/api/messages/<int:message_id>")
    def get_message(message_id: int) -> Any:
        return db.get_or_404(Message, message_id).as_dict()

    return app
