"""The local stack's files, names and environments, shared by ``run``, ``rotate`` and ``env``.

Everything lives under ``.local/`` (``COMMNG_LOCAL_DIR`` moves it): ``stack.json``
(mode 0600: the superuser password, the admin token, ports, the secrets' ARNs), the
``run.lock`` the running ``make run`` holds, the PostgreSQL clusters and the workers'
metrics files. The logins' passwords are not kept: each run writes new ones to the
local Secrets Manager, which is where the service, the CLI and ``rotate`` read them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devstack.postgres import PostgresCluster, write_private_file

ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("COMMNG_LOCAL_DIR", str(ROOT / ".local")))
STATE_FILE = LOCAL / "stack.json"
LOCK_FILE = LOCAL / "run.lock"
ENDPOINT_CONTROL = LOCAL / "endpoint.sock"  # make failover/switchover steer make run's endpoint here
METRICS_DIR = LOCAL / "prometheus"
DATABASE = "comm_ng"

# The shapes of docs/deployment-shapes.md: the service logs in as the app role (its
# secret rotated with alternating users), or as the master (single-user, as RDS does).
SHAPES = ("app", "master")
MASTER_ROLE = "commng_master"  # stands in for RDS's master: LOGIN CREATEROLE, owns the database
APP_ROLE = "commng_app"  # and commng_app_clone, both made by `flask db bootstrap`
OWNER_ROLE = "commng_owner"  # NOLOGIN, owns the tables in the app shape (the config's default)
READER_ROLE = "commng_ro"  # SELECT only, the replica's login
SECRET_NAMES = {"master": "commng/local/master", "app": "commng/local/app", "replica": "commng/local/replica"}
# The local moto server accepts any credentials; these are not secrets. Both region
# variables: CommNG reads AWS_REGION, a plain boto3 client only AWS_DEFAULT_REGION.
DUMMY_AWS = {
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
}


def load_state() -> dict[str, Any]:
    """stack.json, or {} before the first run."""
    if not STATE_FILE.exists():
        return {}
    data: dict[str, Any] = json.loads(STATE_FILE.read_text())
    return data


def save_state(state: Mapping[str, Any]) -> None:
    """stack.json holds the superuser password and the admin token: mode 0600 from its creation."""
    write_private_file(STATE_FILE, json.dumps(state, indent=2))


def service_secret(state: Mapping[str, Any]) -> str:
    """Which secret the service logs in with: "app", or "master" in the master shape."""
    return "master" if state.get("shape") == "master" else "app"


def watched_secrets(state: Mapping[str, Any]) -> list[str]:
    """The secrets the service reads, whose events EventBridge delivers (infra/events.tf)."""
    if state.get("auth") == "iam":
        return []  # IAM tokens: the service reads no secret
    return [service_secret(state), *(["replica"] if "replica" in state.get("secrets", {}) else [])]


# -- PostgreSQL's folders ---------------------------------------------------------------


def pg_datadir() -> Path:
    """.local/pg/data, or a /tmp folder when the postgres user cannot reach .local.

    As root, the server runs as ``postgres``; a checkout under /root (mode 0700) is out
    of its reach, and changing the modes of a user's home is not ours to do.
    """
    preferred = LOCAL / "pg" / "data"
    if os.geteuid() != 0 or _reachable_by_postgres(LOCAL):
        return preferred
    digest = hashlib.sha1(str(LOCAL).encode(), usedforsecurity=False).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"commng-pg-{digest}" / "data"


def standby_base() -> Path:
    """Where the hot standby lives (its data, log and socket), next to the primary's."""
    return pg_datadir().parent / "standby"


def _reachable_by_postgres(path: Path) -> bool:
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", str(path)]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def serving_datadir(state: Mapping[str, Any]) -> Path:
    """The primary's data: the standby's, once ``make failover`` or ``make switchover`` promoted it."""
    return standby_base() / "data" if state.get("serving") == "standby" else pg_datadir()


def database_port(state: Mapping[str, Any]) -> int:
    """Where the service connects: the endpoint (the RDS name), or the primary before it existed."""
    return int(state.get("endpoint_port") or state["pg_port"])


def primary(state: Mapping[str, Any]) -> PostgresCluster:
    """Whatever primary the endpoint serves, for superuser statements (ALTER ROLE of a rotation)."""
    return PostgresCluster(serving_datadir(state), database_port(state), state["superuser_password"])


# -- the run lock -----------------------------------------------------------------------


def hold_run_lock(port: int) -> int:
    """Take .local/run.lock for the life of this process, or exit naming the holder."""
    LOCAL.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(_already_running(_lock_owner())) from None
    # Whatever a crashed run left in the file is replaced; the lock itself died with it.
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "port": port}).encode())
    return fd  # never inherited by children (O_CLOEXEC); closed when this process ends


def _lock_owner() -> dict[str, Any]:
    """The pid and port the running stack wrote into run.lock ({} if not written yet)."""
    try:
        owner = json.loads(LOCK_FILE.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def running_stack() -> dict[str, Any] | None:
    """{pid, port} of the ``run`` that holds .local/run.lock, or None when none does."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _lock_owner()
    finally:
        os.close(fd)  # also releases the shared lock, when we got it
    return None


def _already_running(owner: Mapping[str, Any]) -> str:
    pid = owner.get("pid", "?")
    port = owner.get("port", "?")
    return (
        f"a local stack is already running (pid {pid}, http://127.0.0.1:{port}, state in {LOCAL}): "
        f"stop it with Ctrl-C in its terminal or `kill {pid}`"
    )


def require_running() -> tuple[dict[str, Any], dict[str, Any]]:
    """(lock owner, state) of the running stack, or SystemExit with one line."""
    owner = running_stack()
    if owner is None:
        raise SystemExit(f"no local stack is running (state in {LOCAL}): start it with `make run` first")
    state = load_state()
    if not state.get("secrets"):
        raise SystemExit("the local stack is still starting: try again in a few seconds")
    return owner, state


# -- environments -----------------------------------------------------------------------


def aws_env(state: Mapping[str, Any], secret: str | None = None) -> dict[str, str]:
    """The local Secrets Manager and SQS (one moto server), and the service's secret (or ``secret``'s)."""
    secrets = state["secrets"]
    secret_id = secrets.get(secret or service_secret(state))  # none in iam mode (AUTH=iam)
    return {
        **DUMMY_AWS,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": state["endpoint"],
        "AWS_ENDPOINT_URL_SQS": state["endpoint"],
        **({"DB_ROTATION_QUEUE_URL": state["queue_url"]} if state.get("queue_url") else {}),
        **({"DB_SECRET_ID": secret_id} if secret_id else {}),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(database_port(state)),
        "POSTGRES_DB": DATABASE,
        "POSTGRES_SSL": "false",
    }


# The stack decides these; a value left in the caller's shell must not point it elsewhere.
_STACK_VARIABLES = frozenset(
    {
        "ADMIN_TOKEN_SECRET_ID",  # the stack sets ADMIN_TOKEN and METRICS_TOKEN itself
        "DB_APP_SECRET_ID",
        "DB_OWNER_ROLE",
        "DB_REPLICA_SECRET_ID",
        "METRICS_TOKEN_SECRET_ID",
        "POSTGRES_REPLICA_HOST",
        "POSTGRES_REPLICA_PORT",
    }
)


def service_env(state: Mapping[str, Any], port: int) -> dict[str, str]:
    """gunicorn's environment on the local stack (the caller's other settings pass through)."""
    replica = state["secrets"].get("replica")
    return {
        **{k: v for k, v in os.environ.items() if k not in _STACK_VARIABLES},
        **aws_env(state),
        **({"DB_REPLICA_SECRET_ID": replica} if replica else {}),
        "DB_SECRET_REFRESH_INTERVAL_MS": os.environ.get("DB_SECRET_REFRESH_INTERVAL_MS", "5000"),
        "DB_POOL_GRACE_PERIOD_MS": os.environ.get("DB_POOL_GRACE_PERIOD_MS", "10000"),
        "POSTGRES_POOL_SIZE": os.environ.get("POSTGRES_POOL_SIZE", "5"),
        "ADMIN_TOKEN": state["admin_token"],
        "METRICS_TOKEN": state["metrics_token"],
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
        "PROMETHEUS_MULTIPROC_DIR": str(METRICS_DIR),
        "PORT": str(port),
    }
