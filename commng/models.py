"""The CommNG domain: channels and their messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from commng.db import db

__all__ = ["Channel", "Message", "now"]


def now() -> datetime:
    """The time a row is created at (UTC)."""
    return datetime.now(UTC)


class Channel(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=now)

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
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel_id": self.channel_id,
            "body": self.body,
            "created_at": self.created_at.isoformat(),
        }
