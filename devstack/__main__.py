"""`python -m devstack run|rotate|env`: the local stack behind `make run`, `make rotate`, `make status`.

- ``run`` keeps a cluster under ``.local/``, starts a moto server holding the app role's
  secret, migrates, and runs gunicorn in the foreground. Ctrl-C stops everything. It
  holds ``.local/run.lock`` (an flock, with its pid and port inside) for its whole life:
  a second ``run`` is refused instead of stopping the first one's PostgreSQL. The kernel
  drops the lock when the process ends, so a file left by a crash is never in the way.
- ``rotate`` performs a realistic single-user rotation against that stack: AWSPENDING,
  ALTER ROLE, a pause (the window), then AWSCURRENT moves.
- ``env`` prints the ``export`` lines that point ``flask --app wsgi rotation ...`` at the
  running stack: ``eval "$(.venv/bin/python -m devstack env)"``.

Every failure an operator can meet here ends in one line, not a traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from psycopg2 import sql

from config import check_or_exit
from devstack import events
from devstack.postgres import PostgresCluster, free_port, new_password, write_private_file
from devstack.secrets import rotate_secret, secrets_client

ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("COMMNG_LOCAL_DIR", str(ROOT / ".local")))
STATE_FILE = LOCAL / "stack.json"
LOCK_FILE = LOCAL / "run.lock"
METRICS_DIR = LOCAL / "prometheus"
APP_ROLE = "commng_app"
SECRET_NAME = "commng/local/db"
# The local moto server accepts any credentials; these are not secrets.
DUMMY_AWS = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _pg_datadir() -> Path:
    """.local/pg/data, or a /tmp folder when the postgres user cannot reach .local.

    As root, the server runs as ``postgres``; a checkout under /root (mode 0700) is out
    of its reach, and changing the modes of a user's home is not ours to do.
    """
    preferred = LOCAL / "pg" / "data"
    if os.geteuid() != 0 or _reachable_by_postgres(LOCAL):
        return preferred
    digest = hashlib.sha1(str(LOCAL).encode(), usedforsecurity=False).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"commng-pg-{digest}" / "data"


def _reachable_by_postgres(path: Path) -> bool:
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", str(path)]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _load_state() -> dict[str, Any]:
    if not STATE_FILE.exists():
        return {}
    data: dict[str, Any] = json.loads(STATE_FILE.read_text())
    return data


def _save_state(state: dict[str, Any]) -> None:
    """stack.json holds passwords and the admin token: mode 0600 from its creation."""
    write_private_file(STATE_FILE, json.dumps(state, indent=2))


# -- the run lock ---------------------------------------------------------------------


def _hold_run_lock(port: int) -> int:
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


def _already_running(owner: dict[str, Any]) -> str:
    pid = owner.get("pid", "?")
    port = owner.get("port", "?")
    return (
        f"a local stack is already running (pid {pid}, http://127.0.0.1:{port}, state in {LOCAL}): "
        f"stop it with Ctrl-C in its terminal or `kill {pid}`"
    )


def _require_running() -> tuple[dict[str, Any], dict[str, Any]]:
    """(lock owner, state) of the running stack, or SystemExit with one line."""
    owner = running_stack()
    if owner is None:
        raise SystemExit(f"no local stack is running (state in {LOCAL}): start it with `make run` first")
    state = _load_state()
    if not state.get("secret_arn"):
        raise SystemExit("the local stack is still starting: try again in a few seconds")
    return owner, state


# -- run ------------------------------------------------------------------------------


def _stack_env(state: Mapping[str, Any], port: int) -> dict[str, str]:
    """gunicorn's environment on the local stack (the caller's settings pass through)."""
    return {
        **os.environ,
        **DUMMY_AWS,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": state["endpoint"],
        "AWS_ENDPOINT_URL_SQS": state["endpoint"],
        **({"DB_ROTATION_QUEUE_URL": state["queue_url"]} if state.get("queue_url") else {}),
        "DB_SECRET_ID": state["secret_arn"],
        "DB_SECRET_REFRESH_INTERVAL_MS": os.environ.get("DB_SECRET_REFRESH_INTERVAL_MS", "5000"),
        "DB_POOL_GRACE_PERIOD_MS": os.environ.get("DB_POOL_GRACE_PERIOD_MS", "10000"),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(state["pg_port"]),
        "POSTGRES_DB": "comm_ng",
        "POSTGRES_SSL": "false",
        "POSTGRES_POOL_SIZE": os.environ.get("POSTGRES_POOL_SIZE", "5"),
        "ADMIN_TOKEN": state["admin_token"],
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
        "PROMETHEUS_MULTIPROC_DIR": str(METRICS_DIR),
        "PORT": str(port),
    }


def run(port: int) -> int:
    """Start PostgreSQL, moto and gunicorn in the foreground; Ctrl-C stops them all."""
    lock = _hold_run_lock(port)
    try:
        if os.environ.get("DB_SECRET_ID") or os.environ.get("POSTGRES_USER"):
            return _run_against_environment(port)
        return _run_local_stack(port)
    finally:
        os.close(lock)


def _run_local_stack(port: int) -> int:
    state = _load_state()
    if not state.get("superuser_password"):
        state = {
            "superuser_password": new_password(),
            "app_password": new_password(),
            "admin_token": secrets.token_urlsafe(24),
        }
    state.pop("secret_arn", None)  # a previous run's: `env` and `rotate` wait for this run's
    state.pop("endpoint", None)
    state["pg_port"] = int(state.get("pg_port") or 0) or free_port()
    state["moto_port"] = free_port()
    # The caller's variables (WEB_CONCURRENCY, LOG_LEVEL, ...) are checked before anything starts.
    placeholders = {"endpoint": "http://127.0.0.1:1", "secret_arn": SECRET_NAME}
    check_or_exit(env=_stack_env({**state, **placeholders}, port))
    cluster = PostgresCluster(_pg_datadir(), state["pg_port"], state["superuser_password"])
    if not cluster.initialized:
        print(f"initdb: new PostgreSQL cluster in {cluster.datadir}", flush=True)
        cluster.init()
    cluster.stop("immediate")  # a cluster left running by a killed make run (the lock is ours)
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
        client = secrets_client(endpoint)
        secret = client.create_secret(
            Name=SECRET_NAME,
            SecretString=json.dumps({"username": APP_ROLE, "password": state["app_password"]}),
        )
        queue_url = events.create_rotation_queue(events.sqs_client(endpoint))  # the push path
        state.update(secret_arn=secret["ARN"], endpoint=endpoint, queue_url=queue_url)
        env = _stack_env(state, port)
        migrated = _migrate(env)
        if migrated:
            return migrated
        _save_state(state)
        python = _shown_path(Path(sys.executable))
        print(
            "\nCommNG is starting (Ctrl-C stops everything):\n"
            f"  API      http://127.0.0.1:{port}/api/channels\n"
            f"  ready    http://127.0.0.1:{port}/readyz\n"
            f"  admin    http://127.0.0.1:{port}/admin/   (user admin, token {state['admin_token']})\n"
            f"  metrics  http://127.0.0.1:{port}/metrics   (Authorization: Bearer <the admin token>)\n"
            "  rotate   make rotate   (in another terminal)\n"
            "  status   make status   (every worker's rotation state, from the history)\n"
            f'  CLI      eval "$({python} -m devstack env)"   then   flask --app wsgi rotation status\n',
            flush=True,
        )
        return _serve(["--bind", f"127.0.0.1:{port}"], env, processes)
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
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(METRICS_DIR))
    check_or_exit(env=env)
    return _migrate(env) or _serve([], env, [])


def _migrate(env: Mapping[str, str]) -> int:
    """`flask db upgrade`; 0, or its exit code after one line saying so.

    Without PROMETHEUS_MULTIPROC_DIR: a process that is not a gunicorn worker must not
    leave a file there (its gauges would count as a live worker's forever).
    """
    bindir = Path(sys.executable).parent
    migration_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    code = subprocess.run(
        [str(bindir / "flask"), "--app", "wsgi", "db", "upgrade"], env=migration_env, cwd=ROOT, check=False
    ).returncode
    if code:
        print(f"the migration (flask --app wsgi db upgrade) failed with exit code {code}", file=sys.stderr)
    return code


def _serve(args: list[str], env: Mapping[str, str], processes: list[subprocess.Popen[bytes]]) -> int:
    """Run gunicorn in the foreground; Ctrl-C, SIGTERM or SIGHUP stop it gracefully.

    The metrics directory is emptied right before: only gunicorn's workers write there.
    """
    _reset_dir(Path(env["PROMETHEUS_MULTIPROC_DIR"]))
    gunicorn = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", *args, "wsgi:app"],
        env=env,
        cwd=ROOT,
    )
    processes.append(gunicorn)
    try:
        return gunicorn.wait()
    except KeyboardInterrupt:
        gunicorn.send_signal(signal.SIGTERM)
        return gunicorn.wait(timeout=40)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _shown_path(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it (what a user would type)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- rotate ---------------------------------------------------------------------------


def rotate(pause_s: float = 5.0) -> int:
    """A realistic rotation of the running local stack (see the module docstring)."""
    import botocore.exceptions
    import psycopg2

    from commng_rotation import describe_error

    _, state = _require_running()
    client = secrets_client(state["endpoint"])
    cluster = PostgresCluster(_pg_datadir(), state["pg_port"], state["superuser_password"])
    new = new_password()
    try:
        version = rotate_secret(client, state["secret_arn"], cluster, APP_ROLE, new, pause_s, log=print)
        if state.get("queue_url"):  # what EventBridge delivers once AWSCURRENT moved
            sqs = events.sqs_client(state["endpoint"])
            events.send_rotation_event(sqs, state["queue_url"], state["secret_arn"], version)
            print("event: Secret Label Updated (AWSCURRENT) sent to the rotation-events queue")
    except botocore.exceptions.EndpointConnectionError:
        raise SystemExit(
            f"the local Secrets Manager at {state['endpoint']} does not answer: restart the stack"
        ) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
        raise SystemExit(f"the rotation stopped: Secrets Manager call failed ({code})") from None
    except psycopg2.Error as exc:
        raise SystemExit(f"the rotation stopped: PostgreSQL: {describe_error(exc)}") from None
    _save_state({**state, "app_password": new})
    return 0


# -- env ------------------------------------------------------------------------------


def env_lines() -> list[str]:
    """The shell lines that point `flask --app wsgi rotation ...` at the running stack."""
    owner, state = _require_running()
    variables = {
        **DUMMY_AWS,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": state["endpoint"],
        "AWS_ENDPOINT_URL_SQS": state["endpoint"],
        **({"DB_ROTATION_QUEUE_URL": state["queue_url"]} if state.get("queue_url") else {}),
        "DB_SECRET_ID": state["secret_arn"],
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(state["pg_port"]),
        "POSTGRES_DB": "comm_ng",
        "POSTGRES_SSL": "false",
        "PORT": str(owner.get("port", 8000)),
        # The CLI's own start-up lines (credentials found, fetched) are not the service's.
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "console",
    }
    lines = [
        f"# the local stack running as pid {owner.get('pid', '?')} (state in {LOCAL}), for "
        "`flask --app wsgi rotation status|check|history`",
        "# the database login is read from the local Secrets Manager, as the service does",
        *(f"export {name}={shlex.quote(value)}" for name, value in variables.items()),
        # The CLI is not a gunicorn worker: it must not write the service's metrics files.
        "unset PROMETHEUS_MULTIPROC_DIR",
        "# ADMIN_TOKEN: the admin API's token, needed by `rotation check` only",
        f"export ADMIN_TOKEN={shlex.quote(state['admin_token'])}",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the local stack in the foreground")
    run_parser.add_argument("--port", type=int, default=None, help="gunicorn's port (default: $PORT or 8000)")
    rotate_parser = sub.add_parser("rotate", help="rotate the local stack's database password")
    rotate_parser.add_argument("--pause", type=float, default=5.0, help="seconds inside the window")
    sub.add_parser(
        "env",
        help="print `export` lines for the flask CLI against the running stack; "
        "they include the admin token (ADMIN_TOKEN, for `rotation check`) in plain text",
        description='eval "$(.venv/bin/python -m devstack env)" sets the environment of '
        "`flask --app wsgi rotation ...` for the running local stack. The output includes "
        "ADMIN_TOKEN in plain text (needed by `rotation check`); the database password is not "
        "printed: the CLI reads it from the local Secrets Manager.",
    )
    args = parser.parse_args(argv)
    if args.command == "env":
        print("\n".join(env_lines()))
        return 0
    # A closed terminal (SIGHUP), `kill` (SIGTERM) and Ctrl-C all stop the stack cleanly, also
    # when a shell started us in the background with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if args.command == "run":
        if args.port is None:
            check_or_exit(["PORT"])
        return run(args.port or int(os.environ.get("PORT") or 8000))
    return rotate(args.pause)


if __name__ == "__main__":
    sys.exit(main())
