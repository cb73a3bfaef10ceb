"""What `flask --app wsgi rotation status` reports: each worker's latest attempt per bind.

Built from the rotation history the workers persist (``rotation_events``) and from each
bind's secret in Secrets Manager. A worker holds one engine per bind (the primary, and the
read replica when one is configured), each with its own secret: the replica's own
(DB_REPLICA_SECRET_ID), or the primary's when the replica is only another host
(POSTGRES_REPLICA_HOST). So a worker's row of a bind is compared with that bind's secret's
AWSCURRENT, never with another's.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from commng_rotation import REPLICA_BIND, RotationRecord, Runtime, SecretsUnavailable, rotation_events
from config import Settings

__all__ = ["format_status", "latest_by_worker_and_bind", "status_document"]


def latest_by_worker_and_bind(session: Any, service: str) -> list[RotationRecord]:
    """The latest persisted event of every worker of ``service`` for each of its binds, newest first."""
    t = rotation_events
    query = (
        sa.select(t)
        .where(t.c.service == service)
        .distinct(t.c.worker, t.c.bind)
        .order_by(t.c.worker, t.c.bind, t.c.occurred_at.desc(), t.c.id.desc())
    )
    rows = [RotationRecord(**row._mapping) for row in session.execute(query)]
    return sorted(rows, key=lambda r: (r.occurred_at, r.id), reverse=True)


def _held_version(row: RotationRecord) -> str | None:
    """The version a worker used after its latest attempt (a failed one keeps the old)."""
    return row.old_version if row.outcome == "failed" else row.new_version


def _bind_secret_id(settings: Settings, bind: str | None) -> str | None:
    """The secret ``bind`` logs in with: the replica's own, else the primary's (None: no secret)."""
    if bind == REPLICA_BIND:
        return settings.db_replica_secret_id or settings.db_secret_id
    return settings.db_secret_id


def _bind_states(runtime: Runtime, settings: Settings, recorded: list[str | None]) -> list[dict[str, Any]]:
    """Each bind's secret and its AWSCURRENT: the configured binds, then any other the history holds.

    A replica that logs in with the primary's secret shares its AWSCURRENT (one DescribeSecret).
    """
    states: list[dict[str, Any]] = []
    asked: dict[str, tuple[str | None, str | None]] = {}
    for bind, rotator in runtime.rotators.items():
        secret_id = _bind_secret_id(settings, bind)
        awscurrent: str | None = None
        secret_error: str | None = None
        if secret_id is not None and rotator.source.watchable:
            if secret_id not in asked:
                try:
                    asked[secret_id] = (rotator.source.current_version_id(), None)
                except SecretsUnavailable as exc:
                    asked[secret_id] = (None, exc.code)
            awscurrent, secret_error = asked[secret_id]
        states.append(
            {
                "bind": bind,
                "configured": True,
                "secret_id": secret_id,
                "shared_with_primary": bind is not None
                and secret_id is not None
                and secret_id == settings.db_secret_id,
                "awscurrent_version": awscurrent,
                "secret_error": secret_error,
            }
        )
    for bind in dict.fromkeys(recorded):
        if bind not in runtime.rotators:
            states.append(
                {
                    "bind": bind,
                    "configured": False,
                    "secret_id": None,
                    "shared_with_primary": False,
                    "awscurrent_version": None,
                    "secret_error": None,
                }
            )
    return states


def status_document(
    records: list[RotationRecord], runtime: Runtime, settings: Settings, database: str
) -> dict[str, Any]:
    """The status of ``records`` (each worker's latest per bind), each compared with its bind's AWSCURRENT.

    ``secret_id``, ``awscurrent_version`` and ``secret_error`` are the primary's, as they
    were before binds were listed; ``binds`` holds each bind's.
    """
    binds = _bind_states(runtime, settings, [r.bind for r in records])
    by_bind = {b["bind"]: b for b in binds}
    rows = []
    for row in records:
        version = _held_version(row)
        awscurrent = by_bind[row.bind]["awscurrent_version"]
        matches = None if awscurrent is None or version is None else version == awscurrent
        rows.append({**row.as_dict(), "version": version, "matches_awscurrent": matches})
    for state in binds:
        state["differs_from_awscurrent"] = [
            r["worker"] for r in rows if r["bind"] == state["bind"] and r["matches_awscurrent"] is False
        ]
    primary = by_bind[None]
    document = {
        "source": "rotation_history",
        "database": database,
        # The primary's secret, as before binds were listed; ``binds`` has each bind's.
        "secret_id": primary["secret_id"],
        # "iam": no secret; each new connection logs in with an IAM token (DB_AUTH).
        "auth": settings.db_auth,
        "user": settings.postgres_user if settings.db_auth == "iam" else None,
        "awscurrent_version": primary["awscurrent_version"],
        "secret_error": primary["secret_error"],
        "binds": binds,
        # One row per worker and bind, each compared with its own bind's AWSCURRENT.
        "workers": rows,
        # Workers with any bind on another version than its secret's AWSCURRENT.
        "differs_from_awscurrent": list(
            dict.fromkeys(w for b in binds for w in b["differs_from_awscurrent"])
        ),
    }
    return document


STATUS_COLUMNS = ("worker", "last_event_at", "trigger", "outcome", "version", "awscurrent", "error")


def format_status(document: dict[str, Any]) -> str:
    """The status document as text: a header naming its source, then each bind's secret and table."""
    lines = [
        "# state of the running service, from the rotation history in "
        f"{document['database']} (not this process)"
    ]
    binds = document["binds"]
    for state in binds:
        if state["bind"] is not None:
            lines.append(f"# bind {state['bind']}")
        workers = [w for w in document["workers"] if w["bind"] == state["bind"]]
        if state["bind"] is None and document.get("auth") == "iam":
            lines.append(
                f"source      iam: {document['user']} logs in with an IAM token per new connection "
                "(DB_AUTH=iam, no secret); the version is each worker's latest token's issue time"
            )
            lines += _format_bind({**state, "secret_id": "-"}, workers, secret=False)
            continue
        lines += _format_bind(state, workers)
    lines.append(
        "# times are UTC; a worker that stopped stays listed until its rows are pruned "
        "(ROTATION_HISTORY_RETENTION_DAYS)"
    )
    return "\n".join(lines)


def _format_bind(state: dict[str, Any], workers: list[dict[str, Any]], secret: bool = True) -> list[str]:
    """One bind's secret, AWSCURRENT (``secret``), a row per worker and a summary."""
    bind = state["bind"]
    lines: list[str] = []
    if not secret:
        pass
    elif not state["configured"]:
        lines.append(
            "secret      unknown: no such bind is configured here (POSTGRES_REPLICA_HOST, "
            "DB_REPLICA_SECRET_ID), so its rows are not compared"
        )
    elif state["secret_id"] is None:
        unset = (
            "DB_SECRET_ID is not set"
            if bind is None
            else "neither DB_REPLICA_SECRET_ID nor DB_SECRET_ID is set"
        )
        lines.append(f"secret      none: {unset} (credentials from the environment)")
    else:
        shared = " (the primary's, at POSTGRES_REPLICA_HOST)" if state["shared_with_primary"] else ""
        lines.append(f"secret      {state['secret_id']}{shared}")
        shown = state["awscurrent_version"] or f"unknown ({state['secret_error']})"
        lines.append(f"AWSCURRENT  {shown}")
    if not workers:
        lines.append(
            "no worker has recorded a refresh attempt "
            + ("yet" if bind is None else f"of bind {bind} yet")
            + " (workers record rotations, failures and manual checks: "
            "`flask --app wsgi rotation check` makes one)"
        )
        return lines

    def match(value: bool | None) -> str:
        return "?" if value is None else ("yes" if value else "DIFFERS")

    table = [STATUS_COLUMNS]
    for w in workers:
        table.append(
            (
                w["worker"],
                w["occurred_at"][:19].replace("T", " "),
                w["trigger"],
                w["outcome"].upper() if w["outcome"] == "failed" else w["outcome"],
                w["version"] or "-",
                match(w["matches_awscurrent"]),
                w["error"] or "",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(STATUS_COLUMNS))]
    lines += ["  ".join(c.ljust(n) for c, n in zip(row, widths, strict=True)).rstrip() for row in table]
    differs = state["differs_from_awscurrent"]
    what = "version" if bind is None else f"{bind} version"
    if state["awscurrent_version"] is not None and differs:
        lines.append(
            f"# {len(differs)} of {len(workers)} workers' latest adopted {what} differs from "
            f"AWSCURRENT: {', '.join(differs)}"
        )
    elif state["awscurrent_version"] is not None:
        lines.append(f"# no worker's latest adopted {what} differs from AWSCURRENT")
    return lines
