"""What tests share besides fixtures: the per-test database, bounded polling, leak checks."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3
import flask_migrate
from psycopg2 import sql

from config import Settings
from devstack import PostgresCluster, new_password, running_cluster

# The role that owns the migrated template database; each test's role is granted it.
OWNER_ROLE = "commng_owner"
TEMPLATE_DB = "commng_template"
_counter = itertools.count(1)


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(interval_s)


def assert_no_secrets(text: str, secrets: Iterable[str]) -> None:
    """No password (raw or URL-encoded) appears in ``text``."""
    for secret in secrets:
        for form in {secret, urllib.parse.quote(secret), urllib.parse.quote_plus(secret)}:
            assert form not in text, "a password appears in the captured output"


@dataclass
class Database:
    """A per-test database and the login role the app uses for it."""

    cluster: PostgresCluster
    name: str
    role: str
    password: str

    def settings(self, **overrides: Any) -> Settings:
        """Settings that point the app at this database with env credentials."""
        base = Settings(
            postgres_host="127.0.0.1",
            postgres_port=self.cluster.port,
            postgres_db=self.name,
            postgres_user=self.role,
            postgres_password=self.password,
            postgres_ssl="disable",
            postgres_pool_size=3,
            postgres_max_overflow=2,
            db_pool_grace_period_ms=2000,
            db_secret_refresh_interval_ms=1000,
            log_format="console",
        )
        return replace(base, **overrides)

    def secret_string(self, password: str | None = None) -> str:
        """The RDS-style secret JSON for this role."""
        return json.dumps({"username": self.role, "password": password or self.password})

    def backends(self) -> int:
        """Backends the app role holds open right now."""
        return self.cluster.backend_count(self.role)

    @contextmanager
    def login_refused(self) -> Iterator[None]:
        """ALTER ROLE ... NOLOGIN (ending the role's open sessions) inside the block; LOGIN after."""
        role = sql.Identifier(self.role)
        self.cluster.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(role))
        self.cluster.terminate_backends(self.role, idle_only=False)
        try:
            yield
        finally:
            self.cluster.execute(sql.SQL("ALTER ROLE {} LOGIN").format(role))

    def env(self, login: bool = True, **extra: str) -> dict[str, str]:
        """Environment for a server process: this database, JSON logs, and (``login``) env credentials."""
        env = {
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.cluster.port),
            "POSTGRES_DB": self.name,
            "POSTGRES_SSL": "false",
            "LOG_FORMAT": "json",
        }
        if login:
            env.update(POSTGRES_USER=self.role, POSTGRES_PASSWORD=self.password)
        return {**env, **extra}

    def watched_env(self, moto_endpoint: str, workdir: Path, **extra: str) -> tuple[Any, str, dict[str, str]]:
        """A moto secret holding this login, and the environment of a gunicorn that watches it.

        Returns (boto3 client, secret ARN, env). The secret is the env's only source of the
        login; the refresh interval is 1 s and metrics go to ``workdir/prometheus``.
        """
        client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_endpoint)
        arn = client.create_secret(Name=f"e2e/{self.name}", SecretString=self.secret_string())["ARN"]
        (workdir / "prometheus").mkdir()
        env = self.env(
            login=False,
            DB_SECRET_ID=arn,
            AWS_ENDPOINT_URL_SECRETS_MANAGER=moto_endpoint,
            DB_SECRET_REFRESH_INTERVAL_MS="1000",
            PROMETHEUS_MULTIPROC_DIR=str(workdir / "prometheus"),
            **extra,
        )
        return client, arn, env


def make_template(cluster: PostgresCluster) -> None:
    """The owner role and a database migrated to head, to clone test databases from."""
    from commng.app import create_app
    from commng_rotation import get_runtime

    password = new_password()
    cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(OWNER_ROLE), sql.Literal(password))
    )
    cluster.execute(
        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(TEMPLATE_DB), sql.Identifier(OWNER_ROLE))
    )
    settings = Settings(
        postgres_host="127.0.0.1",
        postgres_port=cluster.port,
        postgres_db=TEMPLATE_DB,
        postgres_user=OWNER_ROLE,
        postgres_password=password,
        postgres_ssl="disable",
    )
    app = create_app(settings, configure_logging=False)
    with app.app_context():
        flask_migrate.upgrade()
    get_runtime(app).stop()


def new_database(cluster: PostgresCluster) -> Database:
    """A fresh database cloned from the template, and a fresh role that can use it."""
    n = next(_counter)
    db = Database(cluster, f"commng_test_{n}", f"app_{n}", new_password())
    cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(db.role), sql.Literal(db.password))
    )
    cluster.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(OWNER_ROLE), sql.Identifier(db.role)))
    cluster.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
            sql.Identifier(db.name), sql.Identifier(TEMPLATE_DB), sql.Identifier(db.role)
        )
    )
    return db


def drop_database(db: Database) -> None:
    """Drop what ``new_database`` made."""
    db.cluster.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db.name)))
    db.cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(db.role)))


# -- faults ------------------------------------------------------------------------------


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port on 127.0.0.1 whose kernel completes the handshake and nobody ever answers."""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def postmaster_pid(cluster: PostgresCluster) -> int:
    """The pid on the first line of postmaster.pid."""
    return int((cluster.datadir / "postmaster.pid").read_text().splitlines()[0])


def cluster_pids(cluster: PostgresCluster) -> list[int]:
    """The postmaster and every process it forked (backends, checkpointer, ...)."""
    parent = postmaster_pid(cluster)
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(entry.name))
    return [parent, *children]


@contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` for the block: their sockets stay open, nothing answers. SIGCONT after."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def adopted(output: str, version: str) -> set[int]:
    """pids of the workers whose JSON log ``output`` has a successful refresh to ``version``."""
    pids = set()
    for line in output.splitlines():
        if '"refresh_succeeded"' in line:
            record = json.loads(line)
            if record.get("new_version") == version:
                pids.add(record["pid"])
    return pids


@contextmanager
def migrated_cluster(prefix: str) -> Iterator[PostgresCluster]:
    """A new PostgreSQL cluster in a temporary directory, with the migrated template; all removed after."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with running_cluster(base) as cluster:
            make_template(cluster)
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the image's venv (tests/test_image.py) ----------------------------------------------

REPO = Path(__file__).resolve().parent.parent
UV = REPO / ".local" / "venvs" / "uv" / "bin" / "uv"


def image_venv_dir() -> Path:
    """Where the venv of requirements.txt and the rotation layer lives, keyed by their hash."""
    layer = [*sorted((REPO / "rotation").rglob("*.py")), REPO / "rotation" / "pyproject.toml"]
    locks = [REPO / "requirements.txt", REPO / "requirements-build.txt"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*locks, *layer])).hexdigest()
    return REPO / ".local" / "venvs" / f"image-{digest[:16]}"


def build_image_venv() -> Path:
    """A venv with exactly requirements.txt and the rotation layer, as the image's builder stage makes it.

    Built once per hash under .local/ (a venv without its ``.complete`` mark is rebuilt).
    """
    venv = image_venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (pytest-xdist runs a collection, and so a background build, per
    # worker): the second waits, then finds the venv complete.
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_image_venv(venv)


def _build_image_venv(venv: Path) -> Path:
    if (venv / ".complete").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    build = venv / ".build"  # the builder's backend venv, as /opt/build in the Dockerfile
    wheels = venv / ".wheels"

    def pip(target: Path) -> list[str]:
        if UV.exists():  # the Makefile's pinned uv: the same files, hash-checked, far faster than pip
            return [
                str(UV),
                "pip",
                "install",
                "--quiet",
                "--no-config",
                "--python",
                str(target / "bin" / "python"),
            ]
        return [str(target / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]

    wheel = [str(build / "bin" / "pip"), "wheel", "--quiet", "--disable-pip-version-check", "--no-deps"]
    for command in (
        [sys.executable, "-m", "venv", str(venv)],
        [*pip(venv), "--require-hashes", "-r", str(REPO / "requirements.txt")],
        [sys.executable, "-m", "venv", str(build)],
        [*pip(build), "--require-hashes", "-r", str(REPO / "requirements-build.txt")],
        [*wheel, "--no-build-isolation", "--wheel-dir", str(wheels), str(REPO / "rotation")],
        [*pip(venv), "--no-deps", str(wheels)],  # the wheel's path, filled in below
    ):
        if command[-1] == str(wheels):
            command = [*command[:-1], *map(str, sorted(wheels.glob("commng_rotation-*.whl")))]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    (venv / ".complete").touch()
    return venv


class _Build:
    """``build_image_venv`` in a daemon thread; ``result()`` waits for it and raises what it raised."""

    def __init__(self) -> None:
        self._venv: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image-venv", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._venv = build_image_venv()
        except BaseException as exc:  # handed to the test that waits in result()
            self._error = exc

    def result(self, timeout_s: float) -> Path:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the image's venv was not built within {timeout_s} s")
        if self._error is not None:
            raise self._error
        assert self._venv is not None
        return self._venv


_image_build: _Build | None = None


def start_image_venv() -> None:
    """Start building the image's venv now, so that the tests before test_image.py run meanwhile.

    Installing requirements.txt takes 25-40 s here, mostly waiting on downloads and disk.
    """
    global _image_build
    if _image_build is None and not (image_venv_dir() / ".complete").exists():
        _image_build = _Build()


def image_venv(timeout_s: float = 240.0) -> Path:
    """The image's venv: the build ``start_image_venv`` started, or a build now."""
    if _image_build is not None:
        return _image_build.result(timeout_s)
    return build_image_venv()
