"""The bench's local stack: one PostgreSQL, one moto, and a database and role per scenario.

The replica scenarios add a hot standby of that PostgreSQL (``pg_basebackup -R``, made
once, on first use) and a SELECT-only login per scenario for it. Everything listens on
127.0.0.1 only and lives under one temporary directory that ``BenchStack.close()``
removes (``--keep`` keeps it, with the gunicorn logs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from bench.moto import CountingMotoServer, bench_client
from devstack import PostgresCluster, free_port, new_password
from devstack.endpoint import Endpoint
from devstack.postgres import make_standby
from devstack.processes import ROOT

__all__ = ["AppDatabase", "BackendSampler", "BenchStack", "ReplicaLogin"]

OWNER_ROLE = "bench_owner"
TEMPLATE_DB = "bench_template"
# How long a role or database made on the primary may take to show on the standby.
REPLAY_TIMEOUT_S = 30.0


@dataclass
class AppDatabase:
    """One scenario's database, and the login role the app uses for it."""

    name: str
    role: str
    password: str
    # ``<role>_clone`` once ``add_clone`` made it (alternating-users rotation).
    clone: str | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the app may log in as in this scenario."""
        return (self.role,) if self.clone is None else (self.role, self.clone)


@dataclass
class ReplicaLogin:
    """The standby, and the replica bind's own login (SELECT only) and secret."""

    standby: PostgresCluster
    role: str
    password: str
    arn: str


class BenchStack:
    """PostgreSQL (scram auth) and moto for the whole run; ``close()`` stops and removes all."""

    def __init__(self, keep: bool = False) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="commng-bench-"))
        self.workdir.chmod(0o711)  # as root, PostgreSQL runs as `postgres` and must reach pg/
        self.keep = keep
        self.cluster = PostgresCluster(self.workdir / "pg" / "data", free_port(), new_password())
        self.moto = CountingMotoServer(free_port())
        self.client: Any = None
        self._owner_password = new_password()
        self._databases = 0
        self._standby: PostgresCluster | None = None
        self._standbys = 0
        # The failover and switchover scenarios' endpoint (RDS's name), made on first use.
        self.endpoint: Endpoint | None = None

    def open(self) -> BenchStack:
        """initdb, start both servers, and migrate a template database once."""
        self.cluster.init()
        with open(self.cluster.datadir / "postgresql.conf", "a") as conf:
            # The bench's cluster only: statements per request are counted at the server.
            conf.write("shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.max = 1000\n")
            # replica-down stops the standby under write load: keep the WAL it will ask for
            # when it comes back (no replication slot: nothing is kept past the run).
            conf.write("wal_keep_size = '256MB'\n")
        self.cluster.start()
        self.cluster.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.moto.start()
        self.client = bench_client(self.moto.endpoint)
        self.cluster.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(OWNER_ROLE), sql.Literal(self._owner_password)
            )
        )
        self.cluster.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(TEMPLATE_DB), sql.Identifier(OWNER_ROLE)
            )
        )
        env = {
            **os.environ,
            **self.postgres_env(TEMPLATE_DB),
            "POSTGRES_USER": OWNER_ROLE,
            "POSTGRES_PASSWORD": self._owner_password,
            "LOG_LEVEL": "WARNING",
        }
        env.pop("DB_SECRET_ID", None)
        flask = str(Path(sys.executable).parent / "flask")
        subprocess.run(
            [flask, "--app", "wsgi", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True
        )
        return self

    def close(self) -> None:
        """Stop moto, the standby and PostgreSQL; remove the work directory unless asked to keep it."""
        self.moto.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        try:
            if self._standby is not None:
                self._standby.stop("immediate")
            self.cluster.stop("immediate")
        finally:
            if self.keep:
                print(f"bench work directory kept: {self.workdir}", flush=True)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def postgres_env(self, dbname: str) -> dict[str, str]:
        """Where the app finds PostgreSQL (the login comes from the secret or POSTGRES_USER)."""
        return {
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.cluster.port),
            "POSTGRES_DB": dbname,
            "POSTGRES_SSL": "false",
        }

    def app_env(
        self, dbname: str, prometheus: Path, pool: tuple[int, int], interval_ms: int, grace_ms: int
    ) -> dict[str, str]:
        """What every benched gunicorn gets: this stack's PostgreSQL and moto (loopback only),
        ``pool`` (size, overflow), the watcher's interval, the grace period, JSON logs."""
        return {
            **self.postgres_env(dbname),
            "POSTGRES_POOL_SIZE": str(pool[0]),
            "POSTGRES_MAX_OVERFLOW": str(pool[1]),
            "DB_SECRET_REFRESH_INTERVAL_MS": str(interval_ms),
            "DB_POOL_GRACE_PERIOD_MS": str(grace_ms),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "PROMETHEUS_MULTIPROC_DIR": str(prometheus),
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": self.moto.endpoint,
        }

    def new_database(self, scenario: str) -> AppDatabase:
        """A database cloned from the migrated template and a fresh role that may use it."""
        self._databases += 1
        slug = f"{scenario.replace('-', '_')}_{self._databases}"
        db = AppDatabase(f"bench_{slug}", f"app_{slug}", new_password())
        self.cluster.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(db.role), sql.Literal(db.password)
            )
        )
        self.cluster.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(OWNER_ROLE), sql.Identifier(db.role))
        )
        self.cluster.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                sql.Identifier(db.name), sql.Identifier(TEMPLATE_DB), sql.Identifier(db.role)
            )
        )
        return db

    def create_secret(self, scenario: str, db: AppDatabase) -> str:
        """An RDS-style secret ({"username", "password"}) for ``db``; returns its ARN."""
        value = json.dumps({"username": db.role, "password": db.password})
        arn: str = self.client.create_secret(Name=f"bench/{db.name}", SecretString=value)["ARN"]
        return arn

    def add_clone(self, db: AppDatabase) -> str:
        """``<role>_clone``, as AWS's alternating-users rotation creates it: LOGIN, granted the role.

        No password yet: the first rotation gives it one before the secret names it.
        """
        clone = f"{db.role}_clone"
        self.cluster.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(clone), sql.Identifier(db.role))
        )
        db.clone = clone
        return clone

    def standby(self) -> PostgresCluster:
        """The hot standby of the bench's PostgreSQL, made and started on first use."""
        if self._standby is None:
            self._standbys += 1
            self._standby = make_standby(self.cluster, self.workdir / f"standby-{self._standbys}")
        return self._standby

    def movable(self) -> PostgresCluster:
        """The endpoint in front of the primary, and its standby synchronous (Multi-AZ).

        Only the failover and switchover scenarios connect through it; the others keep
        the direct port, so the relay costs no other scenario's throughput.
        """
        standby = self.standby()
        self.cluster.set_synchronous(True)
        if self.endpoint is None:
            self.endpoint = Endpoint(self.cluster.port).start()
        self.endpoint.point_at(self.cluster.port)
        return standby

    def promoted(self) -> None:
        """After a failover or switchover the promoted standby is the primary; a later
        scenario that needs a standby gets a new one, made from it."""
        assert self._standby is not None
        old, self.cluster, self._standby = self.cluster, self._standby, None
        old.stop("immediate")

    def add_replica_login(self, db: AppDatabase) -> ReplicaLogin:
        """A SELECT-only login for ``db`` and its secret (the standby's host and port inside).

        Made on the primary; returns once the standby has replayed the grants, so that the
        app's replica bind works from its first connection.
        """
        standby = self.standby()
        role, password = f"{db.role}_reader", new_password()
        self.cluster.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )
        for grant in (
            "GRANT CONNECT ON DATABASE {db} TO {role}",
            "GRANT USAGE ON SCHEMA public TO {role}",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
        ):
            statement = sql.SQL(grant).format(db=sql.Identifier(db.name), role=sql.Identifier(role))
            self.cluster.execute(statement, dbname=db.name)
        value = {"username": role, "password": password, "host": "127.0.0.1", "port": standby.port}
        arn: str = self.client.create_secret(Name=f"bench/{db.name}/replica", SecretString=json.dumps(value))[
            "ARN"
        ]
        self._wait_for_replay(standby, db.name, role)
        return ReplicaLogin(standby, role, password, arn)

    def _wait_for_replay(self, standby: PostgresCluster, dbname: str, role: str) -> None:
        deadline = time.monotonic() + REPLAY_TIMEOUT_S
        while not _replayed(standby, dbname, role):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby did not replay {dbname} within {REPLAY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def passwords(self) -> list[str]:
        """The stack's own passwords (superuser, owner): they must not reach any app log either."""
        return [self.cluster.superuser_password, self._owner_password]

    def missing_ids(self, db: AppDatabase, ids: list[int]) -> int:
        """How many of ``ids`` have no row in ``messages`` (writes lost)."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        rows = self.cluster.execute(
            "SELECT count(*) FROM messages WHERE id = ANY(%s)", (wanted,), dbname=db.name
        )
        return len(wanted) - int(rows[0][0])

    def duplicate_writes(self, db: AppDatabase) -> int:
        """Messages stored more than once (every post's body is unique to it): the extra rows."""
        rows = self.cluster.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM messages GROUP BY body) AS c",
            dbname=db.name,
        )
        return int(rows[0][0])

    def statements(self, db: AppDatabase) -> dict[str, int]:
        """Calls so far of each statement the app role ran in ``db`` (pg_stat_statements).

        Each statement PostgreSQL executed counts once (BEGIN, COMMIT and the pool's
        pre-ping included); statements sent together in one message count apart.
        """
        try:
            rows = self.cluster.execute(
                "SELECT s.query, s.calls FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
                "WHERE d.datname = %s AND r.rolname = ANY(%s)",
                (db.name, list(db.roles)),
            )
        except Exception:  # the db-restart scenario stops the server under us
            return {}
        calls: dict[str, int] = {}
        for query, count in rows:  # one row per role: alternating users run the same statements
            calls[str(query)] = calls.get(str(query), 0) + int(count)
        return calls

    def workdir_for(self, scenario: str) -> Path:
        path = self.workdir / scenario
        path.mkdir(exist_ok=True)
        return path


def _replayed(standby: PostgresCluster, dbname: str, role: str) -> bool:
    """True once ``standby`` has ``dbname`` and ``role`` may read its messages."""
    try:
        rows = standby.execute("SELECT has_table_privilege(%s, 'messages', 'SELECT')", (role,), dbname=dbname)
    except psycopg2.Error:  # the database or the role is not replayed yet
        return False
    return bool(rows and rows[0][0])


@dataclass
class BackendSampler:
    """Counts the backends of ``roles`` in pg_stat_activity every ``period_s`` (a thread)."""

    cluster: PostgresCluster
    roles: tuple[str, ...]
    t0: float
    period_s: float = 0.5
    series: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-backends", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def count_now(self) -> int | None:
        """One count now, or None while PostgreSQL does not answer."""
        try:
            return sum(self.cluster.backend_count(role) for role in self.roles)
        except Exception:  # the db-restart and replica-down scenarios stop a server under us
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            count = self.count_now()
            if count is not None:
                self.series.append((round(time.monotonic() - self.t0, 2), count))
            self._stop.wait(self.period_s)
