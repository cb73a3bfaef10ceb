"""Fixtures of the layer's own tests: a throwaway PostgreSQL with scram auth, moto, a login per test.

Self-contained on purpose: an adopter runs these with ``pip install './rotation[test]'``
and ``pytest rotation/tests``, from a checkout or against an installed wheel. They need
PostgreSQL's server binaries (``initdb``, ``pg_ctl``) on PATH or under
``/usr/lib/postgresql/*/bin``; as root, the server runs as the ``postgres`` user, since
``initdb`` and ``pg_ctl`` refuse to run as root.
"""

from __future__ import annotations

import glob
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psycopg2
import pytest
from moto import mock_aws
from psycopg2 import sql

# Never reach a real AWS account, whatever the environment holds.
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SECRETS_MANAGER"):
    os.environ.pop(_name, None)
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
)

_counter = itertools.count(1)


def new_password() -> str:
    """A random password holding the characters that break a URL built by string formatting."""
    return secrets.token_urlsafe(18) + "#?%&=+:;"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    return Path(candidates[-1]).parent


@dataclass
class Server:
    """A PostgreSQL server on 127.0.0.1:``port`` and its superuser's password."""

    port: int
    superuser_password: str = field(repr=False)

    def connect(self, dbname: str = "postgres", **login: str) -> Any:
        """An autocommit connection, as the superuser unless ``user``/``password`` are given."""
        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            dbname=dbname,
            user=login.get("user", "postgres"),
            password=login.get("password", self.superuser_password),
            connect_timeout=5,
        )
        conn.autocommit = True
        return conn

    def execute(self, statement: Any, params: tuple[Any, ...] = (), dbname: str = "postgres") -> list[Any]:
        """One statement as the superuser; its rows, if any."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params or None)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()


def _run(bindir: Path, *args: str) -> None:
    cmd = [str(bindir / args[0]), *args[1:]]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} exited with {done.returncode}: {done.stderr[-2000:]}")


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """initdb (scram-sha-256 for every connection) and pg_ctl start on a free loopback port."""
    bindir = _bindir()
    base = Path(tempfile.mkdtemp(prefix="commng-rotation-pg-"))
    datadir = base / "data"
    password = new_password()
    try:
        base.chmod(0o755)
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        _run(bindir, "initdb", "-D", str(datadir), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions")  # fmt: skip
        pwfile.unlink()
        with open(datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{base}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        port = _free_port()
        _run(bindir, "pg_ctl", "-D", str(datadir), "-l", str(base / "postgres.log"), "-o", f"-p {port}",
             "-w", "-t", "60", "start")  # fmt: skip
        try:
            yield Server(port, password)
        finally:
            _run(bindir, "pg_ctl", "-D", str(datadir), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Login:
    """A per-test database and the role that owns it (it creates the layer's tables too)."""

    server: Server
    dbname: str
    role: str
    password: str = field(repr=False)

    @staticmethod
    def new_password() -> str:
        """A password for a rotation, as random and as URL-breaking as the first."""
        return new_password()

    def set_password(self, password: str) -> None:
        """ALTER ROLE ... PASSWORD, the password sent as a literal."""
        self.server.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(self.role), sql.Literal(password))
        )
        self.password = password

    def terminate_backends(self) -> None:
        """End every session of the role, as a restart or a failover would."""
        self.server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (self.role,)
        )


@pytest.fixture
def login(server: Server) -> Iterator[Login]:
    """A fresh role (LOGIN, a URL-breaking password) and a database it owns; dropped after."""
    n = next(_counter)
    made = Login(server, f"rotation_test_{n}", f"rotation_app_{n}", new_password())
    server.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(made.role), sql.Literal(made.password)
        )
    )
    server.execute(
        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(made.dbname), sql.Identifier(made.role))
    )
    yield made
    server.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(made.dbname)))
    server.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(made.role)))


@pytest.fixture
def secretsmanager() -> Iterator[Any]:
    """Secrets Manager in-process (moto): the client the app is handed as ``secrets_client``."""
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")
