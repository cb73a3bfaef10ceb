"""`python -m devstack run|rotate`: the local stack behind `make run` and `make rotate`.

- ``run`` keeps a cluster under ``.local/``, starts a moto server holding the app role's
  secret, migrates, and runs gunicorn in the foreground. Ctrl-C stops everything.
- ``rotate`` performs a realistic single-user rotation against that stack: AWSPENDING,
  ALTER ROLE, a pause (the window), then AWSCURRENT moves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
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

from devstack import events
from devstack.postgres import PostgresCluster, free_port, new_password
from devstack.secrets import rotate_secret, secrets_client

ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("COMMNG_LOCAL_DIR", str(ROOT / ".local")))
STATE_FILE = LOCAL / "stack.json"
APP_ROLE = "commng_app"
SECRET_NAME = "commng/local/db"


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
    cluster = PostgresCluster(_pg_datadir(), state["pg_port"], state["superuser_password"])
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
        client = secrets_client(endpoint)
        secret = client.create_secret(
            Name=SECRET_NAME,
            SecretString=json.dumps({"username": APP_ROLE, "password": state["app_password"]}),
        )
        queue_url = events.create_rotation_queue(events.sqs_client(endpoint))  # push (issue 13)
        env = {
            **os.environ,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint,
            "AWS_ENDPOINT_URL_SQS": endpoint,
            "DB_ROTATION_QUEUE_URL": queue_url,
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
        _save_state({**state, "secret_arn": secret["ARN"], "endpoint": endpoint, "queue_url": queue_url})
        print(
            "\nCommNG is starting (Ctrl-C stops everything):\n"
            f"  API      http://127.0.0.1:{port}/api/channels\n"
            f"  ready    http://127.0.0.1:{port}/readyz\n"
            f"  admin    http://127.0.0.1:{port}/admin/   (user admin, token {state['admin_token']})\n"
            f"  metrics  http://127.0.0.1:{port}/metrics\n"
            "  rotate   make rotate   (in another terminal)\n",
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
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(LOCAL / "prometheus"))
    _reset_dir(Path(env["PROMETHEUS_MULTIPROC_DIR"]))
    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "flask"), "--app", "wsgi", "db", "upgrade"], env=env, cwd=ROOT, check=True)
    return _serve([], env, [])


def _serve(args: list[str], env: Mapping[str, str], processes: list[subprocess.Popen[bytes]]) -> int:
    """Run gunicorn in the foreground; Ctrl-C, SIGTERM or SIGHUP stop it gracefully."""
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


def rotate(pause_s: float = 5.0) -> int:
    """A realistic rotation of the running local stack (see the module docstring)."""
    state = _load_state()
    if not state.get("secret_arn"):
        raise SystemExit("no local stack is running: start it with `make run` first")
    client = secrets_client(state["endpoint"])
    cluster = PostgresCluster(_pg_datadir(), state["pg_port"], state["superuser_password"])
    new = new_password()
    version = rotate_secret(client, state["secret_arn"], cluster, APP_ROLE, new, pause_s, log=print)
    if state.get("queue_url"):  # what EventBridge delivers once AWSCURRENT moved (issue 13)
        sqs = events.sqs_client(state["endpoint"])
        events.send_rotation_event(sqs, state["queue_url"], state["secret_arn"], version)
        print("event: Secret Label Updated (AWSCURRENT) event sent to the rotation-events queue")
    _save_state({**state, "app_password": new})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the local stack in the foreground")
    run_parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    rotate_parser = sub.add_parser("rotate", help="rotate the local stack's database password")
    rotate_parser.add_argument("--pause", type=float, default=5.0, help="seconds inside the window")
    args = parser.parse_args(argv)
    # A closed terminal (SIGHUP), `kill` (SIGTERM) and Ctrl-C all stop the stack cleanly, also
    # when a shell started us in the background with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if args.command == "run":
        return run(args.port)
    return rotate(args.pause)


if __name__ == "__main__":
    sys.exit(main())
