"""The CommNG domain: channels and their messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from commng.engines import describe_error
from commng.session import PinnedSession

__all__ = ["Channel", "Message", "db"]


log = structlog.get_logger("commng.models")


class Base(DeclarativeBase):
    pass


class _SQLAlchemy(SQLAlchemy):
    """Flask-SQLAlchemy whose end-of-request cleanup survives a connection that died.

    A read leaves its transaction open until teardown, where closing the session sends
    ROLLBACK. If the backend went away after the view returned (a terminated backend, a
    failover), that ROLLBACK raises, and an exception out of teardown becomes a 500 for
    a request whose response was already complete. Nothing is lost by carrying on: the
    server already ended the transaction with the connection, and SQLAlchemy has
    invalidated the connection, which returns its pool slot.
    """

    def _teardown_session(self, exc: BaseException | None) -> None:
        try:
            self.session.remove()
        except DBAPIError as err:
            log.warning("session_close_failed", error=describe_error(err))
            self.session.registry.clear()


# expire_on_commit=False: a view that commits can still render what it wrote without a
# second transaction (and without a second chance to meet a dead connection).
db = _SQLAlchemy(model_class=Base, session_options={"class_": PinnedSession, "expire_on_commit": False})


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
    __table_args__ = (sa.Index("ix_messages_channel_id_id", "channel_id", "id"),)

    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    channel_id: Mapped[int] = mapped_column(
        sa.BigInteger, sa.ForeignKey("channels.id", ondelete="CASCADE"), nullable=False
    )
    body: Mapped[str] = mapped_column(sa.Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel_id": self.channel_id,
            "body": self.body,
            "created_at": self.created_at.isoformat(),
        }
