"""A real PostgreSQL server (scram-sha-256 password auth) in a folder of its own.

initdb and pg_ctl refuse to run as root ("cannot be run as root"), so as root they run
as the ``postgres`` user, who is given the data directory. Used by `make run`, the test
suite and the benchmark.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in a file that is mode 0600 from its creation.

    The file is created next to ``path`` and renamed over it, so a reader sees the old
    content or the new one, and a wider mode never exists even for an instant.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def new_password() -> str:
    """A random password that contains every character that breaks naive URLs."""
    return secrets.token_urlsafe(18) + "#?%&=+:;"


def pg_bindir() -> Path:
    """The directory of initdb/pg_ctl, or SystemExit with what to install."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if candidates:
        return Path(candidates[-1]).parent
    raise SystemExit(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found. "
        "Install them with: apt-get install -y postgresql"
    )


class PostgresCluster:
    """One PostgreSQL server in ``datadir``, listening on 127.0.0.1:``port``."""

    def __init__(self, datadir: Path, port: int, superuser_password: str) -> None:
        self.datadir = Path(datadir)
        self.port = port
        self.superuser_password = superuser_password
        self.bindir = pg_bindir()
        self.logfile = self.datadir.parent / "postgres.log"
        self.socket_dir = self.datadir.parent / "sock"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr[-2000:]}")

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    @property
    def initialized(self) -> bool:
        """True when initdb already ran in ``datadir``."""
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb with scram-sha-256 for every connection, then our settings."""
        base = self.datadir.parent
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # the postgres user must reach the data dir below it
        self._own(base)
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.socket_dir)
        pwfile = base / "pwfile"
        write_private_file(pwfile, self.superuser_password + "\n")
        self._own(pwfile)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-instructions",
            )
        finally:
            pwfile.unlink()
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# commng test/dev cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 300\n"
            )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            f"-p {self.port}",
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (no error when it is not running)."""
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def promote(self) -> None:
        """End a standby's recovery: it takes writes, on a new timeline (``pg_ctl promote``)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60", "promote")

    def set_synchronous(self, standby: bool) -> None:
        """Every COMMIT waits until a standby has it (``standby``), as RDS Multi-AZ does, or none.

        ``'*'`` names any standby that streams from this server. ALTER SYSTEM writes
        postgresql.auto.conf, which pg_basebackup copies: ``make_standby`` drops these
        settings from its copy, or a promoted standby would wait for a standby of its own.
        """
        for name, value in (("synchronous_standby_names", "*"), ("synchronous_commit", "on")):
            if standby:
                self.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
            else:
                self.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        self.execute("SELECT pg_reload_conf()")

    def connect(self, dbname: str = "postgres") -> Any:
        """An autocommit superuser connection over TCP (password auth)."""
        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self.superuser_password,
            dbname=dbname,
            connect_timeout=5,
        )
        conn.autocommit = True
        return conn

    def execute(
        self, statement: Any, params: Sequence[Any] | None = None, dbname: str = "postgres"
    ) -> list[Any]:
        """Run one statement as the superuser; return its rows (if any)."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def set_password(self, role: str, password: str) -> None:
        """ALTER ROLE ... PASSWORD, with the password sent as a literal, never logged."""
        self.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))

    def terminate_backends(self, role: str, idle_only: bool = True) -> int:
        """pg_terminate_backend for ``role``'s backends (idle ones by default)."""
        condition = "AND state = 'idle'" if idle_only else ""
        rows = self.execute(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE usename = %s AND pid <> pg_backend_pid() {condition}",
            (role,),
        )
        return int(rows[0][0])

    def backend_count(self, role: str) -> int:
        """How many backends ``role`` has open."""
        rows = self.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,))
        return int(rows[0][0])


def make_standby(primary: PostgresCluster, base: Path) -> PostgresCluster:
    """A hot standby of ``primary`` under ``base``, streaming from it; started, or RuntimeError.

    ``pg_basebackup -R -X stream`` as the superuser over TCP (initdb's pg_hba.conf already
    has the ``replication`` lines and PostgreSQL 10+ defaults to ``wal_level = replica``).
    The password goes through a passfile (mode 0600) that ``-R`` names in the standby's
    ``primary_conninfo``, never through an argument or the environment. As root, it runs as
    the postgres user, like ``PostgresCluster._run``.
    """
    standby = PostgresCluster(base / "data", free_port(), primary.superuser_password)
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    primary._own(base)
    standby.socket_dir.mkdir(exist_ok=True)
    primary._own(standby.socket_dir)
    passfile = base / "pgpass"
    write_private_file(
        passfile, f"127.0.0.1:{primary.port}:*:postgres:{_pgpass_escape(primary.superuser_password)}\n"
    )
    primary._own(passfile)
    cmd = [
        str(primary.bindir / "pg_basebackup"),
        "-D",
        str(standby.datadir),
        "-R",
        "-X",
        "stream",
        # An immediate checkpoint: the default spreads it, a minute or more on a busy cluster.
        "--checkpoint=fast",
        "-h",
        "127.0.0.1",
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-d",
        f"passfile={passfile}",
        "--no-password",
    ]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed ({result.returncode}): {result.stderr[-2000:]}")
    with open(standby.datadir / "postgresql.conf", "a") as conf:
        conf.write(
            f"\n# commng standby\nunix_socket_directories = '{standby.socket_dir}'\nhot_standby = on\n"
        )
    _drop_primary_only_settings(standby.datadir / "postgresql.auto.conf")
    standby.start()
    return standby


# What the primary's role sets (ALTER SYSTEM, so in postgresql.auto.conf), and a promoted
# standby must not inherit: a wait for a standby of its own, or a read-only switchover.
_PRIMARY_ONLY = ("synchronous_standby_names", "synchronous_commit", "default_transaction_read_only")


def _drop_primary_only_settings(auto_conf: Path) -> None:
    if not auto_conf.exists():
        return
    lines = auto_conf.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip().startswith(_PRIMARY_ONLY)]
    if kept != lines:
        auto_conf.write_text("".join(kept))  # in place: the file stays the postgres user's


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


@contextmanager
def running_cluster(base: Path) -> Iterator[PostgresCluster]:
    """A new cluster under ``base`` for the duration of the block (tests, bench)."""
    cluster = PostgresCluster(base / "data", free_port(), new_password())
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
