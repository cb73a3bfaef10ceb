"""A session whose transaction stays on the engine it began on.

Flask-SQLAlchemy's session looks up the engine on every statement, so an engine swap
in the middle of a transaction would move the rest of it to another backend. This
session snapshots the engines when a transaction begins and keeps using them until
that transaction ends; the next transaction sees the new engine.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import SessionTransaction

__all__ = ["PinnedSession"]


class PinnedSession(Session):
    """Flask-SQLAlchemy session that pins each transaction to one engine per bind."""

    def __init__(self, db: SQLAlchemy, **kwargs: Any) -> None:
        super().__init__(db, **kwargs)
        # Flask-SQLAlchemy hands its extension to the session class: keep our own reference.
        self._extension = db
        self._pinned: dict[str | None, Engine] | None = None

    def get_bind(
        self,
        mapper: Any | None = None,
        clause: Any | None = None,
        bind: Engine | Connection | None = None,
        **kwargs: Any,
    ) -> Engine | Connection:
        """The engine Flask-SQLAlchemy would choose, as it was when the transaction began."""
        chosen = super().get_bind(mapper=mapper, clause=clause, bind=bind, **kwargs)
        if bind is not None or not isinstance(chosen, Engine):
            return chosen
        pinned = self._pinned
        if pinned is None:  # the transaction begins: its engines are today's
            self._pinned = dict(self._extension.engines)
            return chosen
        for engine in pinned.values():  # no swap since it began (every statement but rare ones)
            if engine is chosen:
                return chosen
        for key, engine in self._extension.engines.items():
            if engine is chosen:
                return pinned.get(key, chosen)
        return chosen


def _unpin(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, PinnedSession):
        session._pinned = None


# Once, for the class: a listener added per instance costs SQLAlchemy a listener
# collection for every session, i.e. every request. Sessions of other classes are
# not PinnedSessions and pass through _unpin untouched.
sa.event.listen(PinnedSession, "after_transaction_end", _unpin)
