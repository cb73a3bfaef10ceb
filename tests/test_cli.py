"""`flask --app wsgi rotation status|check` against a running service: gunicorn (2 gevent
workers) on moto and PostgreSQL, rotated once. One stack for the whole module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from psycopg2 import sql

from devstack import PostgresCluster, free_port, new_password, rotate_secret
from devstack.processes import GunicornServer
from tests.helpers import OWNER_ROLE, Database, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
FLASK = [str(Path(sys.executable).parent / "flask"), "--app", "wsgi", "rotation"]
TOKEN = "cli-admin-token-0123456789abcdef"


@dataclass
class Stack:
    server: GunicornServer
    database: Database
    version: str
    workers: set[str]
    cli_env: dict[str, str]
    passwords: list[str]

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FLASK, *args],
            cwd=ROOT,
            env={**self.cli_env, **env},
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    def rows(self, query: str, *params: object) -> list[Any]:
        return self.database.cluster.execute(query, params, dbname=self.database.name)


@pytest.fixture(scope="module")
def module_database(pg: PostgresCluster) -> Iterator[Database]:
    """Like conftest's ``database``, for the module: a clone of the template and its own role."""
    db = Database(pg, "commng_cli", "app_cli", new_password())
    role, name = sql.Identifier(db.role), sql.Identifier(db.name)
    pg.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(db.password)))
    pg.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(OWNER_ROLE), role))
    pg.execute(sql.SQL("CREATE DATABASE {} TEMPLATE commng_template OWNER {}").format(name, role))
    yield db
    pg.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))
    pg.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture(scope="module")
def stack(module_database: Database) -> Iterator[Stack]:
    """gunicorn with 2 workers watching a moto secret; one rotation both workers recorded."""
    database = module_database
    workdir = Path(tempfile.mkdtemp(prefix="commng-cli-"))
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    client, arn, env = database.watched_env(
        endpoint, workdir, POSTGRES_POOL_SIZE="3", DB_POOL_GRACE_PERIOD_MS="1000", ADMIN_TOKEN=TOKEN
    )
    server = GunicornServer(env, free_port(), 2, workdir / "gunicorn.log")
    try:
        server.start()
        new = new_password()
        version = rotate_secret(client, arn, database.cluster, database.role, new)
        stack = Stack(server, database, version, set(), {}, [database.password, new, TOKEN])

        def both_recorded() -> bool:
            rows = stack.rows(
                "SELECT DISTINCT worker FROM rotation_events WHERE outcome = 'rotated' AND new_version = %s",
                version,
            )
            stack.workers = {r[0] for r in rows}
            return len(stack.workers) == 2

        wait_for(both_recorded, timeout_s=30)
        # What `python -m devstack env` gives a shell: the secret, the database's address, the
        # token; never PROMETHEUS_MULTIPROC_DIR (the CLI is not a worker).
        stack.cli_env = {
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            **{k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            "PORT": str(server.port),
            "LOG_LEVEL": "WARNING",
        }
        yield stack
    finally:
        code = server.stop()
        moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert code == 0


def _table(stdout: str) -> dict[str, list[str]]:
    """The status table's rows by worker (columns split on runs of spaces)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("worker "))
    rows = {}
    for line in lines[header + 1 :]:
        if line.startswith("#"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def test_status_shows_every_worker_of_the_running_service_not_the_cli(stack: Stack) -> None:
    result = stack.cli("status")

    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    db = stack.database
    assert lines[0] == (
        "# state of the running service, from the rotation history in "
        f"127.0.0.1:{db.cluster.port}/{db.name} (not this process)"
    )
    assert lines[2] == f"AWSCURRENT  {stack.version}"
    rows = _table(result.stdout)
    assert set(rows) == stack.workers  # the two gunicorn workers, and not the CLI's own pid
    for cells in rows.values():
        # Learnt by its own poll, a refused login, or another worker's NOTIFY.
        assert cells[3] in {"poll", "auth_failure", "notify"}
        assert cells[4:6] == ["rotated", stack.version]
        assert cells[6] == "yes"
    assert "# no worker's latest adopted version differs from AWSCURRENT" in lines
    assert result.stderr == ""
    assert_no_secrets(result.stdout, stack.passwords)

    document = json.loads(stack.cli("status", "--json").stdout)
    assert document["source"] == "rotation_history"
    assert document["awscurrent_version"] == stack.version
    assert {w["worker"] for w in document["workers"]} == stack.workers
    assert all(w["matches_awscurrent"] for w in document["workers"])
    assert document["differs_from_awscurrent"] == []


def test_status_names_a_worker_whose_latest_version_is_not_awscurrent(stack: Stack) -> None:
    """A worker of an earlier deployment, stopped before the rotation, as its rows remain."""
    gone = "gone-host:4242"
    stack.rows(
        "INSERT INTO rotation_events (id, service, occurred_at, worker, trigger, outcome, old_version, "
        "new_version) VALUES (%s, 'commng', now() - interval '1 hour', %s, 'poll', 'rotated', "
        "'v-older', 'v-old')",
        "f" * 32,
        gone,
    )
    try:
        result = stack.cli("status")
    finally:
        stack.rows("DELETE FROM rotation_events WHERE worker = %s", gone)

    assert result.returncode == 0, result.stderr[-2000:]
    rows = _table(result.stdout)
    assert rows[gone][5:7] == ["v-old", "DIFFERS"]
    assert f"# 1 of 3 workers' latest adopted version differs from AWSCURRENT: {gone}" in result.stdout


def test_check_makes_one_worker_of_the_service_check_and_record_it(stack: Stack) -> None:
    before = stack.rows("SELECT count(*) FROM rotation_events WHERE trigger = 'manual'")[0][0]

    result = stack.cli("check", "--url", stack.server.url)

    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    worker = first.split()[1]
    assert worker in stack.workers
    assert first == f"worker {worker} checked the secret: AWSCURRENT unchanged"
    assert f"current version {stack.version}" in result.stdout
    # The server writes the check to the history (its writer batches for about a second).
    wait_for(
        lambda: stack.rows("SELECT count(*) FROM rotation_events WHERE trigger = 'manual'")[0][0] > before,
        timeout_s=15,
    )
    status = _table(stack.cli("status").stdout)
    assert status[worker][3:6] == ["manual", "unchanged", stack.version]
    assert_no_secrets(result.stdout + result.stderr, stack.passwords)


def test_check_with_a_token_the_service_does_not_know_is_one_line(stack: Stack) -> None:
    wrong = "not-the-admin-token-0123456789"

    result = stack.cli("check", "--url", stack.server.url, ADMIN_TOKEN=wrong)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: the admin API at {stack.server.url} refused ADMIN_TOKEN (401): "
        "it is not the running service's token"
    ]
    assert_no_secrets(result.stdout + result.stderr, [*stack.passwords, wrong])


# -- binds: the primary and the replica, each compared with its own secret's AWSCURRENT ----------


def _section(stdout: str, bind: str) -> tuple[list[str], dict[str, list[str]]]:
    """The ``# bind <bind>`` section of the status: its header lines and its rows by worker."""
    lines = stdout.splitlines()
    start = lines.index(f"# bind {bind}") + 1
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("worker "))
    rows = {}
    for line in lines[header + 1 :]:
        if line.startswith("#"):
            break
        rows[line.split()[0]] = line.split()
    return lines[start:header], rows


def _replica_rows(stack: Stack, versions: dict[str, str]) -> None:
    """Each worker's replica adoption, newer than its primary one (as a replica rotation leaves it)."""
    for n, (worker, version) in enumerate(sorted(versions.items())):
        stack.rows(
            "INSERT INTO rotation_events (id, service, occurred_at, worker, bind, trigger, outcome, "
            "old_version, new_version) VALUES (%s, 'commng', now(), %s, 'replica', 'poll', 'rotated', "
            "'v-replica-0', %s)",
            f"{n:032x}",
            worker,
            version,
        )


def test_status_compares_the_replica_bind_with_the_replica_secret(stack: Stack) -> None:
    """After a replica rotation: the primary rows still match, the replica rows match their own secret."""
    db = stack.database
    client = boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=stack.cli_env["AWS_ENDPOINT_URL_SECRETS_MANAGER"],
    )
    login = {
        "username": db.role,
        "password": stack.passwords[1],
        "host": "127.0.0.1",
        "port": db.cluster.port,
    }
    arn = client.create_secret(Name=f"replica/{db.name}", SecretString=json.dumps(login))["ARN"]
    replica_version = client.put_secret_value(SecretId=arn, SecretString=json.dumps(login))["VersionId"]
    behind, current = sorted(stack.workers)
    _replica_rows(stack, {behind: "v-replica-old", current: replica_version})
    try:
        result = stack.cli("status", DB_REPLICA_SECRET_ID=arn)
        document = json.loads(stack.cli("status", "--json", DB_REPLICA_SECRET_ID=arn).stdout)
    finally:
        stack.rows("DELETE FROM rotation_events WHERE bind = 'replica'")

    assert result.returncode == 0, result.stderr[-2000:]
    primary = _table(result.stdout)
    assert set(primary) == stack.workers
    assert all(cells[5:7] == [stack.version, "yes"] for cells in primary.values())
    assert "# no worker's latest adopted version differs from AWSCURRENT" in result.stdout
    header, replica = _section(result.stdout, "replica")
    assert header == [f"secret      {arn}", f"AWSCURRENT  {replica_version}"]
    assert replica[current][5:7] == [replica_version, "yes"]
    assert replica[behind][5:7] == ["v-replica-old", "DIFFERS"]
    assert (
        f"# 1 of 2 workers' latest adopted replica version differs from AWSCURRENT: {behind}" in result.stdout
    )
    assert_no_secrets(result.stdout, stack.passwords)

    assert document["awscurrent_version"] == stack.version  # the primary's, as before
    assert [(b["bind"], b["secret_id"], b["awscurrent_version"]) for b in document["binds"]] == [
        (None, document["secret_id"], stack.version),
        ("replica", arn, replica_version),
    ]
    assert {(w["worker"], w["bind"], w["matches_awscurrent"]) for w in document["workers"]} == {
        *((worker, None, True) for worker in stack.workers),
        (current, "replica", True),
        (behind, "replica", False),
    }
    assert document["differs_from_awscurrent"] == [behind]


def test_status_compares_a_replica_on_the_primary_secret_with_that_secret(stack: Stack) -> None:
    """POSTGRES_REPLICA_HOST without DB_REPLICA_SECRET_ID: one secret, one AWSCURRENT for both binds."""
    _replica_rows(stack, dict.fromkeys(stack.workers, stack.version))
    replica_at = {
        "POSTGRES_REPLICA_HOST": "127.0.0.1",
        "POSTGRES_REPLICA_PORT": str(stack.database.cluster.port),
    }
    try:
        result = stack.cli("status", **replica_at)
        document = json.loads(stack.cli("status", "--json", **replica_at).stdout)
    finally:
        stack.rows("DELETE FROM rotation_events WHERE bind = 'replica'")

    assert result.returncode == 0, result.stderr[-2000:]
    assert all(cells[5:7] == [stack.version, "yes"] for cells in _table(result.stdout).values())
    header, replica = _section(result.stdout, "replica")
    assert header == [
        f"secret      {document['secret_id']} (the primary's, at POSTGRES_REPLICA_HOST)",
        f"AWSCURRENT  {stack.version}",
    ]
    assert set(replica) == stack.workers
    assert all(cells[5:7] == [stack.version, "yes"] for cells in replica.values())
    assert document["binds"][1]["shared_with_primary"] is True
    assert document["differs_from_awscurrent"] == []
