"""The local stack behind `make run` and `make rotate`, and the PostgreSQL harness tests use.

Development tooling only: nothing in the request path imports this module.

- ``PostgresCluster`` runs a real PostgreSQL (scram-sha-256 password auth) in a folder
  of its own. initdb and pg_ctl refuse to run as root, so as root they run as the
  ``postgres`` user (shared/NOTES.md).
- ``python -m commng.devstack run`` keeps a cluster under ``.local/``, starts a moto
  server holding the app role's secret, migrates, and runs gunicorn in the foreground.
- ``python -m commng.devstack rotate`` performs a realistic single-user rotation against
  that stack: AWSPENDING, ALTER ROLE, a pause, then AWSCURRENT moves.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("COMMNG_LOCAL_DIR", str(ROOT / ".local")))
STATE_FILE = LOCAL / "stack.json"
APP_ROLE = "commng_app"
SECRET_NAME = "commng/local/db"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
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
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "  # noqa: S608
            f"WHERE usename = %s AND pid <> pg_backend_pid() {condition}",
            (role,),
        )
        return int(rows[0][0])

    def backend_count(self, role: str) -> int:
        """How many backends ``role`` has open."""
        rows = self.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,))
        return int(rows[0][0])


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


# -- make run / make rotate ------------------------------------------------------------


def _secrets_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _load_state() -> dict[str, Any]:
    if not STATE_FILE.exists():
        return {}
    data: dict[str, Any] = json.loads(STATE_FILE.read_text())
    return data


def _save_state(state: dict[str, Any]) -> None:
    STATE_FILE.write_text(json.dumps(state, indent=2))
    STATE_FILE.chmod(0o600)


def run(port: int = 8000) -> int:
    """Start PostgreSQL, moto and gunicorn in the foreground; Ctrl-C stops them all."""
    if os.environ.get("DB_SECRET_ID") or os.environ.get("POSTGRES_USER"):
        return _run_against_environment(port)
    LOCAL.mkdir(exist_ok=True)
    state = _load_state()
    if not state.get("superuser_password"):
        state = {
            "superuser_password": new_password(),
            "app_password": new_password(),
            "admin_token": secrets.token_urlsafe(24),
        }
    state["pg_port"] = int(state.get("pg_port") or 0) or free_port()
    state["moto_port"] = free_port()
    cluster = PostgresCluster(LOCAL / "pg" / "data", state["pg_port"], state["superuser_password"])
    if not cluster.initialized:
        print(f"initdb: new PostgreSQL cluster in {cluster.datadir}", flush=True)
        cluster.init()
    cluster.stop("immediate")  # a cluster left running by a killed make run
    _save_state(state)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start()
        if not cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)):
            cluster.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(APP_ROLE)))
            cluster.execute(sql.SQL("CREATE DATABASE comm_ng OWNER {}").format(sql.Identifier(APP_ROLE)))
        cluster.set_password(APP_ROLE, state["app_password"])
        moto_bin = str(Path(sys.executable).parent / "moto_server")
        processes.append(
            subprocess.Popen(
                [moto_bin, "-H", "127.0.0.1", "-p", str(state["moto_port"])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for_port(state["moto_port"])
        endpoint = f"http://127.0.0.1:{state['moto_port']}"
        client = _secrets_client(endpoint)
        secret = client.create_secret(
            Name=SECRET_NAME,
            SecretString=json.dumps({"username": APP_ROLE, "password": state["app_password"]}),
        )
        env = {
            **os.environ,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint,
            "DB_SECRET_ID": secret["ARN"],
            "DB_SECRET_REFRESH_INTERVAL_MS": os.environ.get("DB_SECRET_REFRESH_INTERVAL_MS", "5000"),
            "DB_POOL_GRACE_PERIOD_MS": os.environ.get("DB_POOL_GRACE_PERIOD_MS", "10000"),
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(state["pg_port"]),
            "POSTGRES_DB": "comm_ng",
            "POSTGRES_SSL": "false",
            "POSTGRES_POOL_SIZE": os.environ.get("POSTGRES_POOL_SIZE", "5"),
            "ADMIN_TOKEN": state["admin_token"],
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
            "PROMETHEUS_MULTIPROC_DIR": str(LOCAL / "prometheus"),
            "PORT": str(port),
        }
        _reset_dir(LOCAL / "prometheus")
        bindir = Path(sys.executable).parent
        subprocess.run(
            [str(bindir / "flask"), "--app", "wsgi", "db", "upgrade"], env=env, cwd=ROOT, check=True
        )
        _save_state({**state, "secret_arn": secret["ARN"], "endpoint": endpoint})
        print(
            "\nCommNG is starting (Ctrl-C stops everything):\n"
            f"  API      http://127.0.0.1:{port}/api/channels\n"
            f"  ready    http://127.0.0.1:{port}/readyz\n"
            f"  admin    http://127.0.0.1:{port}/admin/   (user admin, token {state['admin_token']})\n"
            f"  metrics  http://127.0.0.1:{port}/metrics\n"
            "  rotate   make rotate   (in another terminal)\n",
            flush=True,
        )
        gunicorn = subprocess.Popen(
            [str(bindir / "gunicorn"), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "wsgi:app"],
            env=env,
            cwd=ROOT,
        )
        processes.append(gunicorn)
        try:
            return gunicorn.wait()
        except KeyboardInterrupt:
            gunicorn.send_signal(signal.SIGTERM)
            return gunicorn.wait(timeout=40)
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        cluster.stop("fast")
        print("local stack stopped", flush=True)


def _run_against_environment(port: int) -> int:
    """DB_SECRET_ID or POSTGRES_* are set: migrate and serve against those, no local stack."""
    print("DB_SECRET_ID or POSTGRES_USER is set: using that database, not the local stack", flush=True)
    env = {"PORT": str(port), "LOG_FORMAT": "console", **os.environ}
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(LOCAL / "prometheus"))
    _reset_dir(Path(env["PROMETHEUS_MULTIPROC_DIR"]))
    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "flask"), "--app", "wsgi", "db", "upgrade"], env=env, cwd=ROOT, check=True)
    gunicorn = subprocess.Popen(
        [str(bindir / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], env=env, cwd=ROOT
    )
    try:
        return gunicorn.wait()
    except KeyboardInterrupt:
        gunicorn.send_signal(signal.SIGTERM)
        return gunicorn.wait(timeout=40)


def _reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def rotate(pause_s: float = 5.0) -> int:
    """A realistic rotation of the running local stack (see the module docstring)."""
    state = _load_state()
    if not state.get("secret_arn"):
        raise SystemExit("no local stack is running: start it with `make run` first")
    client = _secrets_client(state["endpoint"])
    cluster = PostgresCluster(LOCAL / "pg" / "data", state["pg_port"], state["superuser_password"])
    new = new_password()
    rotate_secret(client, state["secret_arn"], cluster, APP_ROLE, new, pause_s, log=print)
    _save_state({**state, "app_password": new})
    return 0


def rotate_secret(
    client: Any,
    secret_id: str,
    cluster: PostgresCluster,
    role: str,
    new_password: str,
    pause_s: float = 0.0,
    log: Any = None,
    before_current: Any = None,
) -> str:
    """What RDS does: AWSPENDING, ALTER ROLE, (window), AWSCURRENT moves. Returns the version id."""
    say = log or (lambda *_: None)
    current = client.describe_secret(SecretId=secret_id)["VersionIdsToStages"]
    old_version = next(v for v, stages in current.items() if "AWSCURRENT" in stages)
    token = secrets.token_hex(16)
    client.put_secret_value(
        SecretId=secret_id,
        ClientRequestToken=token,
        SecretString=json.dumps({"username": role, "password": new_password}),
        VersionStages=["AWSPENDING"],
    )
    say(f"1/4 AWSPENDING written (version {token})")
    cluster.set_password(role, new_password)
    say(f"2/4 ALTER ROLE {role}: the database now wants the new password")
    if before_current is not None:
        before_current()
    if pause_s:
        say(f"3/4 the rotation window: {pause_s:.0f} s with AWSCURRENT still old")
        time.sleep(pause_s)
    client.update_secret_version_stage(
        SecretId=secret_id, VersionStage="AWSCURRENT", MoveToVersionId=token, RemoveFromVersionId=old_version
    )
    client.update_secret_version_stage(
        SecretId=secret_id, VersionStage="AWSPENDING", RemoveFromVersionId=token
    )
    say(f"4/4 AWSCURRENT moved to {token}")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commng.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the local stack in the foreground")
    run_parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    rotate_parser = sub.add_parser("rotate", help="rotate the local stack's database password")
    rotate_parser.add_argument("--pause", type=float, default=5.0, help="seconds inside the window")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.port)
    return rotate(args.pause)


if __name__ == "__main__":
    sys.exit(main())
