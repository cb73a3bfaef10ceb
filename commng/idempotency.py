"""``Idempotency-Key`` on the POSTs that create something: a repeat gets the first answer.

The semantics are the IETF httpapi draft's (and Stripe's):

- The key (1-255 printable ASCII characters; a structured-field string in quotes is
  accepted too) and a fingerprint of the request (sha256 of method, path and body) are
  stored in the same transaction as what the POST creates, with its status and id.
- A repeat with the same key and fingerprint writes nothing and gets the first answer,
  with ``Idempotent-Replayed: true``; with another fingerprint, 422.
- A repeat while the first is still in flight waits for it (its key row is locked until
  the first commits or aborts) and then replays; past the statement timeout, 409.
- Keys are scoped to the caller. The API has no authentication yet, so every key belongs
  to the empty principal: two clients that pick the same key share it. The primary key
  is (principal, key), ready for one.
- Keys are kept IDEMPOTENCY_KEY_TTL_S (24 h by default) and pruned in the background.

No round trip is added when the key is new: the key's row and the created row go out in
one message (``claim``): INSERT the key (ON CONFLICT DO NOTHING), then one statement that
creates the resource only if this transaction holds the key, and stores its id in the
key's row. The key is read from the primary, never a replica.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from flask import Flask, current_app, request
from sqlalchemy.exc import OperationalError

from commng.db import db
from commng.errors import APIError
from commng_rotation import bounds, error_code, witness

__all__ = ["KEY_HEADER", "REPLAYED_HEADER", "claim_sql", "create_once", "init_app", "request_key"]

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# No authentication yet: every key is this principal's (see the module docstring).
PRINCIPAL = ""
QUERY_CANCELED = "57014"  # SQLSTATE: the statement timeout ran out (waiting for the first)
PRUNE_EVERY_S = 3600.0
PRUNE_DEADLINE_S = 10.0
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_KEY_WITNESS = (
    "SELECT 1 FROM idempotency_keys WHERE principal = %(principal)s AND key = %(key)s "
    "AND resource_id = %(id)s"
)
EXTENSION = "commng.idempotency"
log = structlog.get_logger("commng.idempotency")


def request_key() -> str | None:
    """The request's Idempotency-Key, or None without one; 400 for a key that is not one."""
    raw = request.headers.get(KEY_HEADER)
    if raw is None:
        return None
    key = raw
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':  # a structured-field string
        key = raw[1:-1]
        if '"' in key or "\\" in key:
            key = ""  # escapes inside are not supported: refused below
    if not _KEY.fullmatch(key) or not key.strip():
        raise APIError(
            400, "invalid_idempotency_key", f"{KEY_HEADER} must be 1-255 printable ASCII characters"
        )
    return key


def fingerprint() -> bytes:
    """sha256 of the request's method, path and body: what makes a repeat the same request."""
    digest = hashlib.sha256()
    for part in (
        request.method.encode(),
        request.path.encode("utf-8", "surrogateescape"),
        request.get_data(),
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def claim_sql(create: str, returning: str) -> str:
    """The one message that takes the key and creates the resource only if it did.

    ``create`` is ``INSERT INTO <table> (...) SELECT ...`` without a WHERE; it runs only
    when this transaction holds the key (its row is the only one whose status is NULL: a
    row is committed with its status set). ``returning`` names the created columns.
    """
    # Built once per route at import from the route's own constant SQL: no input reaches it.
    return (
        "INSERT INTO idempotency_keys (principal, key, fingerprint, resource) "  # noqa: S608
        "VALUES (:principal, :key, :fingerprint, :resource) ON CONFLICT DO NOTHING; "
        f"WITH created AS ({create} WHERE EXISTS (SELECT 1 FROM idempotency_keys "
        "WHERE principal = :principal AND key = :key AND status IS NULL) "
        f"RETURNING {returning}) "
        "UPDATE idempotency_keys k SET status = :status, resource_id = created.id FROM created "
        "WHERE k.principal = :principal AND k.key = :key "
        f"RETURNING {', '.join(f'created.{c.strip()}' for c in returning.split(','))}"
    )


def create_once(
    key: str,
    resource: str,
    sql: str,
    params: Mapping[str, Any],
    render: Callable[[Mapping[str, Any]], dict[str, Any]],
    load: Callable[[int], dict[str, Any] | None],
    status: int = 201,
) -> Any:
    """Create with ``sql`` (``claim_sql``) under ``key``, or answer as the first request was answered.

    ``render`` turns the created row into the response body; ``load`` renders a stored
    resource by id for a replay (None: it is gone since). Database errors other than the
    statement timeout go to the caller (a foreign key, a unique name).
    """
    values = {**params, "principal": PRINCIPAL, "key": key, "fingerprint": fingerprint()}
    values.update(resource=resource, status=status)
    for _ in range(2):  # the first holder may roll back while we look: take the key then
        try:
            row = db.session.execute(sa.text(sql), values).mappings().first()
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != QUERY_CANCELED:
                raise
            db.session.rollback()
            raise APIError(
                409, "idempotency_key_in_use", f"a request with this {KEY_HEADER} is in flight"
            ) from None
        if row is not None:
            # A failover that cuts the COMMIT is judged by the key's row (commng_rotation.witness).
            witness(db.session, _KEY_WITNESS, {"principal": PRINCIPAL, "key": key, "id": row["id"]})
            db.session.commit()
            _pruner().maybe_prune()
            return render(dict(row)), status
        db.session.rollback()
        stored = _stored(key)
        if stored is None:
            continue
        if bytes(stored.fingerprint) != values["fingerprint"]:
            raise APIError(422, "idempotency_key_reused", f"this {KEY_HEADER} was used for another request")
        if stored.resource != resource or stored.resource_id is None:
            break
        body = load(int(stored.resource_id))
        if body is None:
            raise APIError(410, "gone", f"what this {KEY_HEADER} created is gone")
        return body, int(stored.status), {REPLAYED_HEADER: "true"}
    raise APIError(409, "idempotency_key_in_use", f"a request with this {KEY_HEADER} is in flight")


def _stored(key: str) -> Any:
    """The committed row of ``key`` (read on the primary), or None."""
    return db.session.execute(
        sa.text(
            "SELECT fingerprint, resource, resource_id, status FROM idempotency_keys "
            "WHERE principal = :principal AND key = :key"
        ),
        {"principal": PRINCIPAL, "key": key},
    ).first()


@dataclass
class KeyPruner:
    """Deletes keys older than the TTL, at most once an hour per worker, off the request."""

    ttl_s: int
    engine: Callable[[], sa.Engine]
    last: float | None = None
    deleted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def maybe_prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self.last is not None and now - self.last < PRUNE_EVERY_S:
                return
            self.last = now
        engine = self.engine()  # the request's: a rotation may install another later
        threading.Thread(target=self.prune, args=(engine,), name="commng-key-pruner", daemon=True).start()

    def prune(self, engine: sa.Engine) -> int:
        """Delete the expired keys now; how many went (0, logged, when the database failed)."""
        try:
            with bounds.deadline(PRUNE_DEADLINE_S), engine.begin() as conn:
                result = conn.execute(
                    sa.text(
                        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => :ttl)"
                    ),
                    {"ttl": self.ttl_s},
                )
        except Exception as exc:  # housekeeping: the next hour tries again
            log.warning("idempotency_keys_prune_failed", error=error_code(exc))
            return 0
        self.deleted += int(result.rowcount)
        if result.rowcount:
            log.info("idempotency_keys_pruned", deleted=int(result.rowcount), ttl_s=self.ttl_s)
        return int(result.rowcount)


def _pruner() -> KeyPruner:
    pruner: KeyPruner = current_app.extensions[EXTENSION]
    return pruner


def init_app(app: Flask) -> None:
    """Keep this app's key pruner (IDEMPOTENCY_KEY_TTL_S)."""
    ttl_s = app.config["COMMNG_SETTINGS"].idempotency_key_ttl_s
    app.extensions[EXTENSION] = KeyPruner(ttl_s, lambda: db.engine)
