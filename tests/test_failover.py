"""A failover and an endpoint that moves early, on a real primary, a real standby and the endpoint.

- A COMMIT cut by a crash whose WAL never reached the standby: the promoted standby hands
  the same transaction id to a transaction of its own, which commits. ``pg_xact_status`` on
  the new primary then says "committed" for a write that does not exist there; a 201 on
  that word would acknowledge a lost write. The verdict comes from another timeline, so
  the id is not asked: the POST's witness (its row) is, and it is not there, so the POST
  runs again on the new primary: 201 with a message that exists, once. A view that names
  no witness gets ``503 commit_outcome_unknown``, and the message is not there.
- The endpoint moved to a server still in recovery (the name repointed before the promotion
  finished): writes there fail with 25006 and wait, reads are served meanwhile, and the write
  is taken once the server is promoted: one 201, one row.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from commng import api
from devstack.endpoint import Endpoint
from devstack.postgres import PostgresCluster, make_standby
from tests.helpers import Database, assert_no_secrets, migrated_cluster, new_database, wait_for

IN_SYNC_WAIT = (
    "SELECT pid, backend_xid::text FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND datname = %s"
)


@dataclass
class Pair:
    primary: PostgresCluster
    standby: PostgresCluster
    endpoint: Endpoint
    database: Database

    def settings(self, **overrides: Any) -> Any:
        return self.database.settings(postgres_port=self.endpoint.port, db_outage_wait_ms=20_000, **overrides)

    def replayed(self) -> bool:
        """The standby has replayed all the primary has written so far.

        The insert position, not the write position: the suite's cluster commits
        asynchronously, so a commit record can still be in the WAL buffers, where a crash
        (``stop -m immediate``) loses it.
        """
        lsn = self.primary.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
        return bool(self.standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0][0])


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A primary of its own (this test crashes or promotes), its hot standby, and the endpoint."""
    base = Path(tempfile.mkdtemp(prefix="commng-failover-"))
    base.chmod(0o755)
    try:
        with migrated_cluster("commng-failover-pg-") as primary:
            standby = make_standby(primary, base / "standby")
            try:
                with Endpoint(primary.port) as endpoint:
                    yield Pair(primary, standby, endpoint, new_database(primary))
            finally:
                standby.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _in_background(call: Any) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(call()))
    thread.start()
    return thread, answers


def _count(cluster: PostgresCluster, database: Database, body: str) -> int:
    rows = cluster.execute("SELECT count(*) FROM messages WHERE body = %s", (body,), dbname=database.name)
    return int(rows[0][0])


@pytest.mark.parametrize("witnessed", [True, False], ids=["witnessed", "no-witness"])
def test_a_promoted_standby_that_reused_the_id_never_gets_a_lost_write_acknowledged(
    pair: Pair,
    make_app: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    witnessed: bool,
) -> None:
    if not witnessed:
        monkeypatch.setattr(api, "witness", lambda *args: None)
    app: Flask = make_app(pair.settings())
    client = app.test_client()
    channel = client.post("/api/channels", json={"name": "failover"}).json["id"]
    wait_for(pair.replayed)
    # The standby stops receiving WAL, and every COMMIT on the primary waits for a standby
    # that never answers: the POST's commit record is flushed on the primary only.
    pair.standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
    pair.standby.execute("SELECT pg_reload_conf()")
    wait_for(lambda: not pair.standby.execute("SELECT 1 FROM pg_stat_wal_receiver"))
    pair.primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    pair.primary.execute("ALTER SYSTEM SET synchronous_commit = on")
    pair.primary.execute("SELECT pg_reload_conf()")

    body = "cut by the crash"
    thread, answers = _in_background(
        lambda: client.post(f"/api/channels/{channel}/messages", json={"body": body})
    )
    waiting: list[Any] = []

    def committing() -> bool:
        assert thread.is_alive(), f"the POST ended before its COMMIT waited: {answers[0].json}"
        waiting.extend(pair.primary.execute(IN_SYNC_WAIT, (pair.database.name,)))
        return bool(waiting)

    wait_for(committing, timeout_s=30)
    xid = max(int(row[1]) for row in waiting)  # the POST's (other waiters are the layer's own rows)

    # The crash: the endpoint refuses (stale DNS) while the standby is promoted and, on it,
    # transactions of its own take ids up to and including the POST's, and commit.
    pair.endpoint.refuse()
    pair.primary.stop("immediate")
    pair.standby.promote()
    taken = 0
    while taken < xid:
        taken = int(pair.standby.execute("SELECT txid_current()")[0][0])
    assert taken == xid, f"the promoted standby did not reuse xid {xid} (it is at {taken})"
    assert pair.standby.execute("SELECT pg_xact_status(%s::text::xid8)", (xid,))[0][0] == "committed"
    pair.endpoint.point_at(pair.standby.port)

    thread.join(timeout=60)
    assert not thread.is_alive()
    answer = answers[0]
    if witnessed:
        # Written again on the new primary: the 201 names a message that exists, once.
        assert answer.status_code == 201, answer.json
        assert "commit_outcome_witnessed" in caplog.text
        stored = pair.standby.execute(
            "SELECT id FROM messages WHERE body = %s", (body,), dbname=pair.database.name
        )
        assert stored == [(answer.json["id"],)]
    else:
        assert answer.status_code == 503, answer.json
        assert answer.json["error"]["code"] == "commit_outcome_unknown"
        assert answer.headers["Retry-After"] == "1"
        assert _count(pair.standby, pair.database, body) == 0  # the write is not on the new primary
        assert "commit_outcome_unanchored" in caplog.text
    assert_no_secrets(caplog.text, [pair.database.password, pair.primary.superuser_password])


def test_an_endpoint_moved_to_a_server_still_in_recovery_holds_writes_until_it_is_promoted(
    pair: Pair, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app: Flask = make_app(pair.settings())
    client = app.test_client()
    channel = client.post("/api/channels", json={"name": "early"}).json["id"]
    wait_for(pair.replayed)
    pair.endpoint.point_at(pair.standby.port)  # the name moved; the standby is not promoted yet
    pair.primary.stop("fast")
    # Pooled connections reach the stopped primary no more; new ones land on the standby.
    thread, answers = _in_background(
        lambda: client.post(f"/api/channels/{channel}/messages", json={"body": "held"})
    )
    wait_for(lambda: "request_waiting_for_a_writable_primary" in caplog.text, timeout_s=15)
    # While the write waits, reads are served (by the server in recovery).
    for _ in range(3):
        assert client.get(f"/api/channels/{channel}/messages").status_code == 200
    assert thread.is_alive()
    pair.standby.promote()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert answers[0].status_code == 201, answers[0].json
    assert _count(pair.standby, pair.database, "held") == 1
