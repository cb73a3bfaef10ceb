"""End to end: the replica bind under gunicorn (2 gevent workers) through the replica's own
rotation, then a restart of the standby.

The standby is a real ``pg_basebackup`` hot standby of the suite's cluster. The replica
has a secret of its own in moto: a SELECT-only login, with the standby's host and port
inside. While a few clients post messages, read each one back at once and list channels
and messages, (1) the replica's secret rotates as Secrets Manager's single-user rotation
does (the primary's secret stays), and (2) the standby is stopped, then started again.
The bar: no request fails, every 201 reads back at once, the replica serves reads before,
between and after, both workers adopt the replica's new version, the fallback is logged,
and no password appears in gunicorn's output.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql

from devstack import PostgresCluster, free_port, new_password
from devstack.postgres import make_standby
from devstack.processes import GunicornServer
from tests.helpers import Database, adopted, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

WORKERS = 2
CLIENTS = 4
TOKEN = "e2e-replica-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def standby(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    base = Path(tempfile.mkdtemp(prefix="commng-e2e-standby-"))
    base.chmod(0o755)
    try:
        cluster = make_standby(pg, base / "standby")
        try:
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _on_standby(standby: PostgresCluster, query: str, *params: object) -> bool:
    try:
        return bool(standby.execute(query, params))
    except Exception:  # the standby starting up
        return False


@pytest.fixture
def reader(database: Database, standby: PostgresCluster) -> Iterator[tuple[str, str]]:
    """The replica's own login, created on the primary, SELECT only; (name, password)."""
    name, password = f"{database.role}_ro", new_password()
    role = sql.Identifier(name)
    database.cluster.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
    for grant in (
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database.name), role),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role),
        sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(role),
    ):
        database.cluster.execute(grant, dbname=database.name)
    wait_for(lambda: _on_standby(standby, "SELECT 1 FROM pg_roles WHERE rolname = %s", name))
    wait_for(lambda: _on_standby(standby, "SELECT 1 FROM pg_database WHERE datname = %s", database.name))
    try:
        yield name, password
    finally:
        database.cluster.execute(sql.SQL("DROP OWNED BY {}").format(role), dbname=database.name)
        database.cluster.execute(sql.SQL("DROP ROLE {}").format(role))


def _rotate_single_user(
    client: Any, arn: str, cluster: PostgresCluster, password: str, in_window: Callable[[], object]
) -> str:
    """Secrets Manager's single-user rotation; returns the new version id.

    createSecret: AWSPENDING is AWSCURRENT's value with a new password (host, port and
    dbname kept, as AWS's rotation function keeps them); setSecret: ALTER ROLE on the
    primary (the standby replays it); ``in_window`` runs while AWSCURRENT still holds the
    old password; finishSecret: AWSCURRENT moves.
    """
    current = client.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")
    value = json.loads(current["SecretString"])
    token = secrets.token_hex(16)
    client.put_secret_value(
        SecretId=arn,
        ClientRequestToken=token,
        SecretString=json.dumps({**value, "password": password}),
        VersionStages=["AWSPENDING"],
    )
    cluster.set_password(value["username"], password)
    in_window()
    client.update_secret_version_stage(
        SecretId=arn,
        VersionStage="AWSCURRENT",
        MoveToVersionId=token,
        RemoveFromVersionId=current["VersionId"],
    )
    client.update_secret_version_stage(SecretId=arn, VersionStage="AWSPENDING", RemoveFromVersionId=token)
    return token


@dataclass
class ReadYourWrites:
    """Client threads: post a message, read it back at once, list the channel and the channels."""

    url: str
    channel: int
    requests: int = 0
    created: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not stop"

    def _call(self, session: requests.Session, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = session.request(method, self.url + path, timeout=15, **kwargs)
            body, status = response.json(), response.status_code
        except Exception as exc:  # a transport failure is a failed request
            body, status = None, type(exc).__name__
        with self._lock:
            self.requests += 1
            if not (isinstance(status, int) and 200 <= status < 300):
                self.failures.append(f"{method} {path}: {status} {str(body)[:200]}")
        return body if status in (200, 201) else None

    def _client(self, n: int) -> None:
        with requests.Session() as session:
            # A connection per request: either worker may take each one.
            session.headers["Connection"] = "close"
            i = 0
            while not self._stop.is_set():
                text = f"client {n} message {i}"
                posted = self._call(
                    session, "POST", f"/api/channels/{self.channel}/messages", json={"body": text}
                )
                if posted is not None:
                    with self._lock:
                        self.created += 1
                    read = self._call(session, "GET", f"/api/messages/{posted['id']}")
                    if read is not None and read.get("body") != text:
                        with self._lock:
                            self.failures.append(f"message {posted['id']} read back as {read!r}")
                self._call(session, "GET", f"/api/channels/{self.channel}/messages?limit=5")
                self._call(session, "GET", "/api/channels")
                i += 1
                self._stop.wait(0.02)  # pacing: a small load on a shared machine


def _reads(server: GunicornServer, bind: str) -> float:
    """commng_db_reads_total{bind} over every worker (multiprocess metrics)."""
    response = requests.get(f"{server.url}/metrics", headers={**AUTH, "Connection": "close"}, timeout=10)
    assert response.status_code == 200, response.text[:200]
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "commng_db_reads_total" and sample.labels.get("bind") == bind
    )


def _logged(server: GunicornServer, event: str, since: int) -> list[dict[str, Any]]:
    """The JSON records of ``event`` that gunicorn's output holds past offset ``since``."""
    return [json.loads(line) for line in server.output()[since:].splitlines() if f'"{event}"' in line]


def _pids(server: GunicornServer, event: str, since: int) -> set[int]:
    """The workers that logged ``event`` past offset ``since``."""
    return {r["pid"] for r in _logged(server, event, since)}


def _in_window(server: GunicornServer, bind: str) -> list[dict[str, Any]]:
    """The refreshes of ``bind`` that adopted AWSPENDING (a refused login in the rotation window)."""
    return [
        r for r in _logged(server, "refresh_succeeded", 0) if r["bind"] == bind and r["stage"] == "AWSPENDING"
    ]


def _replica_rotations(server: GunicornServer, version: str) -> set[str]:
    """Workers whose persisted history has the replica bind rotated to ``version``."""
    response = requests.get(f"{server.url}/admin/api/rotations?limit=200", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text[:200]
    return {
        e["worker"]
        for e in response.json()["events"]
        if e["bind"] == "replica" and e["outcome"] == "rotated" and e["new_version"] == version
    }


def test_replica_rotation_and_restart_under_load_fail_no_request(
    database: Database,
    standby: PostgresCluster,
    reader: tuple[str, str],
    moto_endpoint: str,
    workdir: Path,
) -> None:
    started = time.monotonic()
    name, password = reader
    client, primary_arn, env = database.watched_env(
        moto_endpoint,
        workdir,
        POSTGRES_POOL_SIZE="3",
        DB_POOL_GRACE_PERIOD_MS="1000",
        ADMIN_TOKEN=TOKEN,
    )
    replica_secret = {
        "username": name,
        "password": password,
        "host": "127.0.0.1",
        "port": standby.port,
        "dbname": database.name,
    }
    replica_arn = client.create_secret(
        Name=f"replica/{database.name}", SecretString=json.dumps(replica_secret)
    )["ARN"]
    primary_version = client.describe_secret(SecretId=primary_arn)["VersionIdsToStages"]
    env["DB_REPLICA_SECRET_ID"] = replica_arn
    server = GunicornServer(env, free_port(), WORKERS, workdir / "gunicorn.log", monitor_blocking=True)
    new = new_password()
    try:
        server.start()
        channel = requests.post(
            f"{server.url}/api/channels", json={"name": "replica-e2e"}, timeout=10
        ).json()["id"]
        load = ReadYourWrites(server.url, channel)
        load.start()
        try:
            wait_for(lambda: _reads(server, "replica") >= 20, timeout_s=20)

            # (1) The replica's secret rotates; the primary's does not.
            def in_window() -> None:
                # Once the standby has the new password, end the replica's sessions: every
                # worker's next replica read logs in anew and is refused, until it adopts
                # AWSPENDING through the reactive path (or AWSCURRENT by its poll).
                verifier = "SELECT rolpassword FROM pg_authid WHERE rolname = %s"
                wait_for(
                    lambda: standby.execute(verifier, (name,)) == database.cluster.execute(verifier, (name,))
                )
                standby.terminate_backends(name, idle_only=False)
                wait_for(lambda: _in_window(server, "replica"), timeout_s=15)

            version = _rotate_single_user(client, replica_arn, database.cluster, new, in_window)
            wait_for(lambda: len(adopted(server.output(), version)) == WORKERS, timeout_s=20)
            after_rotation = _reads(server, "replica")
            wait_for(lambda: _reads(server, "replica") >= after_rotation + 10, timeout_s=20)

            # (2) The standby stops, then starts again; each worker finds out on its own.
            workers = {r["pid"] for r in _logged(server, "worker_ready", 0)}
            stopped_at = len(server.output())
            standby.stop("fast")
            try:
                wait_for(lambda: _pids(server, "replica_unavailable", stopped_at) == workers, timeout_s=15)
                replica_while_down = _reads(server, "replica")
            finally:
                started_at = len(server.output())
                standby.start()
            wait_for(lambda: _pids(server, "replica_reads_resumed", started_at) == workers, timeout_s=15)
            wait_for(lambda: _reads(server, "replica") >= replica_while_down + 10, timeout_s=15)
            # Both workers' replica rotation is in the persisted history (written in the background).
            wait_for(lambda: len(_replica_rotations(server, version)) == WORKERS, timeout_s=10)
        finally:
            load.stop()
        replica_total, primary_total = _reads(server, "replica"), _reads(server, "primary")
        # The replica's login never reached the primary: every replica read used the
        # secret's host, before and after the rotation.
        assert database.cluster.backend_count(name) == 0
    finally:
        code = server.stop()
    output = server.output()

    assert load.failures == [], "\n".join([*load.failures[:10], *server.problems()])
    assert load.created >= 20, "the clients did not run"
    assert client.describe_secret(SecretId=primary_arn)["VersionIdsToStages"] == primary_version
    # Only the replica's login rotated: every refresh in either worker was the replica's.
    assert {r["bind"] for r in _logged(server, "refresh_succeeded", 0)} == {"replica"}
    fallbacks = _logged(server, "replica_unavailable", stopped_at)
    assert code == 0
    assert_no_secrets(output, [database.password, password, new])
    assert server.blocking_reports() == []  # no greenlet held a worker's loop > 100 ms
    print(
        f"\nreplica e2e: {load.requests} requests, {len(load.failures)} failed, {load.created} written and "
        f"read back, replica share of reads {replica_total / (replica_total + primary_total):.0%}, "
        f"{len(_in_window(server, 'replica'))} worker(s) adopted AWSPENDING in the window, fallbacks "
        f"{sorted({f['reason'] for f in fallbacks})}, {time.monotonic() - started:.1f} s"
    )
