"""A session whose transaction stays on the engine it began on.

Flask-SQLAlchemy's session looks up the engine on every statement, so an engine swap
in the middle of a transaction would move the rest of it to another backend. This
session snapshots the engines when a transaction begins and keeps using them until
that transaction ends; the next transaction sees the new engine.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import structlog
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import SessionTransaction

from commng_rotation.retry import settle
from commng_rotation.xid import ATTEMPT_XIDS

__all__ = ["PinnedSession"]

log = structlog.get_logger("commng_rotation.session")


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

    def commit(self) -> None:
        """Commit; inside ``retry_on_disconnect``, a COMMIT cut by a dead connection is judged.

        When PostgreSQL says the transaction committed (``retry.settle``), this returns as a
        commit that succeeded: the objects it wrote keep their attributes, ids included,
        and the view answers as if the reply had not been lost. Otherwise the error stands.
        """
        noted = ATTEMPT_XIDS.get()
        if noted is None:
            super().commit()
            return
        before = len(noted)
        try:
            super().commit()
        except DBAPIError as exc:
            commit = noted[-1] if len(noted) > before else None
            if commit is None or not exc.connection_invalidated:
                raise
            if settle(self._extension.engine, commit) != "committed":
                raise
            log.warning("commit_confirmed_after_disconnect")


def _unpin(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, PinnedSession):
        session._pinned = None


# Once, for the class: a listener added per instance costs SQLAlchemy a listener
# collection for every session, i.e. every request. Sessions of other classes are
# not PinnedSessions and pass through _unpin untouched.
sa.event.listen(PinnedSession, "after_transaction_end", _unpin)
