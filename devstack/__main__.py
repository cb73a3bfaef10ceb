"""`python -m devstack run|rotate|env|failover|switchover|where`: the local stack behind `make run`.

- ``run [--shape app|master] [--replica [0|1]]`` keeps a cluster under ``.local/``, starts
  a moto server (Secrets Manager and SQS) holding this run's secrets, migrates, and runs
  gunicorn in the foreground. Ctrl-C stops everything, gunicorn gracefully. It holds ``.local/run.lock`` (an
  flock, with its pid and port inside) for its whole life: a second ``run`` is refused
  instead of stopping the first one's PostgreSQL. The kernel drops the lock when the
  process ends, so a file left by a crash is never in the way.

  ``--shape`` and ``--replica`` choose what the stack is made of (devstack/shapes.py):
  the app role with alternating users plus a hot standby by default, as the Terraform
  deploys by default.
- ``rotate`` rotates one secret as AWS does for it (devstack/rotate.py).
- ``failover`` and ``switchover`` move the endpoint (RDS's name) to the standby as RDS
  does (devstack/moves.py, devstack/topology.py); ``where`` says which server it serves.
- ``env`` prints the ``export`` lines that point ``flask --app wsgi rotation ...`` at the
  running stack: ``eval "$(.venv/bin/python -m devstack env)"``.

Every failure an operator can meet here ends in one line, not a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from config import check_or_exit
from devstack import events, iam_mode, shapes, topology
from devstack.endpoint import Endpoint
from devstack.postgres import PostgresCluster, free_port, new_password
from devstack.rotate import rotate
from devstack.secrets import secrets_client
from devstack.stack import (
    ENDPOINT_CONTROL,
    LOCAL,
    METRICS_DIR,
    ROOT,
    SECRET_NAMES,
    SHAPES,
    aws_env,
    hold_run_lock,
    load_state,
    pg_datadir,
    require_running,
    save_state,
    service_env,
    service_secret,
)


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


# -- run ------------------------------------------------------------------------------


def run(port: int, shape: str | None = None, replica: bool | None = None, auth: str | None = None) -> int:
    """Start PostgreSQL, moto and gunicorn in the foreground; Ctrl-C stops them all."""
    against_environment = bool(os.environ.get("DB_SECRET_ID") or os.environ.get("POSTGRES_USER"))
    if against_environment and (shape is not None or replica is not None or auth is not None):
        raise SystemExit(
            "DB_SECRET_ID or POSTGRES_USER is set, so make run uses that database: SHAPE, REPLICA and "
            "AUTH (--shape, --replica, --auth) choose the local stack's shape and do not apply"
        )
    if auth == "iam" and shape == "master":
        raise SystemExit(
            "AUTH=iam needs the app shape (the Terraform refuses db_auth=iam in master mode too): "
            "drop SHAPE=master"
        )
    shape = shape or "app"
    replica = shape == "app" if replica is None else replica
    if replica and shape == "master":
        raise SystemExit(
            "SHAPE=master runs without a replica (the Terraform refuses db_replica_enabled in master "
            "mode too): drop REPLICA=1, or use the app shape"
        )
    lock = hold_run_lock(port)
    try:
        if against_environment:
            return _run_against_environment(port)
        return _run_local_stack(port, shape, replica, auth == "iam")
    finally:
        os.close(lock)


def _run_local_stack(port: int, shape: str, replica: bool, iam: bool = False) -> int:
    # Only the cluster's superuser password, the admin and metrics tokens and the port outlive
    # a run; the secrets (and their logins' passwords) are new each time, in a new moto server.
    outliving = ("superuser_password", "admin_token", "metrics_token", "pg_port", "endpoint_port", "iam_port")
    previous = load_state()
    kept = {k: v for k, v in previous.items() if k in outliving}
    if not kept.get("superuser_password"):
        kept = {"superuser_password": new_password(), "admin_token": secrets.token_urlsafe(24)}
    kept.setdefault("metrics_token", secrets.token_urlsafe(24))  # a state file from before it
    state: dict[str, Any] = {**kept, "shape": shape, "moto_port": free_port()}
    state["pg_port"] = int(state.get("pg_port") or 0) or free_port()
    state["endpoint_port"] = int(state.get("endpoint_port") or 0) or free_port()
    if iam:
        state["auth"] = "iam"
        state["iam_port"] = int(state.get("iam_port") or 0) or free_port()
    # The caller's variables (WEB_CONCURRENCY, LOG_LEVEL, ...) are checked before anything starts.
    placeholders = {"endpoint": "http://127.0.0.1:1", "secrets": dict(SECRET_NAMES)}
    check_or_exit(env=service_env({**state, **placeholders}, port))
    cluster = PostgresCluster(pg_datadir(), state["pg_port"], state["superuser_password"])
    if not cluster.initialized:
        print(f"initdb: new PostgreSQL cluster in {cluster.datadir}", flush=True)
        cluster.init()
    if previous.get("serving") == "standby":  # the last run ended after a failover or switchover
        shapes.adopt_promoted(cluster)
    # A cluster and a standby left running by a killed make run (the lock is ours now).
    cluster.stop("immediate")
    shapes.discard_standby(cluster)
    save_state(state)
    processes: list[subprocess.Popen[bytes]] = []
    standby: PostgresCluster | None = None
    endpoint: Endpoint | None = None
    iam_stack: iam_mode.IamStack | None = None
    try:
        # moto takes a second or two to import: it starts while PostgreSQL does its part.
        moto_bin = str(Path(sys.executable).parent / "moto_server")
        processes.append(
            subprocess.Popen(
                [moto_bin, "-H", "127.0.0.1", "-p", str(state["moto_port"])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **_STOPPED_BY_US,
            )
        )
        cluster.start()
        passwords = {name: new_password() for name in SECRET_NAMES}
        shapes.prepare_database(cluster, shape, passwords)
        if replica:
            standby = shapes.start_standby(cluster)
            state["standby_port"] = standby.port
        # As in RDS Multi-AZ: a COMMIT is acknowledged once the standby has it.
        cluster.set_synchronous(standby is not None)
        # The endpoint stands for RDS's DNS name: the service and the CLI connect to it, and
        # make failover / make switchover move it (devstack/moves.py).
        endpoint = Endpoint(cluster.port, port=state["endpoint_port"]).start()
        endpoint.serve_control(ENDPOINT_CONTROL)
        _wait_for_port(state["moto_port"])
        endpoint_url = f"http://127.0.0.1:{state['moto_port']}"
        arns = shapes.create_secrets(
            secrets_client(endpoint_url), shape, passwords, endpoint.port, standby, with_app=not iam
        )
        # The push path; with IAM there is no secret, so no event to hear.
        queue_url = None if iam else events.create_rotation_queue(events.sqs_client(endpoint_url))
        state.update(secrets=arns, endpoint=endpoint_url, queue_url=queue_url)
        env = service_env(state, port)
        if iam:
            # The stack's endpoint, for iam_stack's backend: it follows make failover/switchover.
            to_database = endpoint
            iam_stack = iam_mode.IamStack(cluster, lambda: ("127.0.0.1", to_database.port), state["iam_port"])
            iam_stack.prepare()
            migrated = _migrate("bootstrap", iam_mode.bootstrap_env(env, arns["master"]))
            if not migrated:
                iam_stack.start()
            env = iam_mode.service_env(env, state)
        else:
            migrated = _migrate(*shapes.migration(shape, env, arns))
        if migrated:
            return migrated
        save_state(state)
        _banner(state, port, standby)
        return _serve(["--bind", f"127.0.0.1:{port}"], env, processes)
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if iam_stack is not None:
            iam_stack.stop()
        if endpoint is not None:
            endpoint.stop()
        # After a failover or switchover these are the promoted standby and the stopped old primary.
        if standby is not None:
            standby.stop("fast")
        cluster.stop("fast")
        print("local stack stopped", flush=True)


def _banner(state: Mapping[str, Any], port: int, standby: PostgresCluster | None) -> None:
    python = _shown_path(Path(sys.executable))
    shape, replica = shapes.describe(state["shape"], standby)
    if state.get("auth") == "iam" and standby is not None:
        replica = f"hot standby 127.0.0.1:{standby.port}, synchronous, for make failover (unread in iam mode)"
    others = "master|replica" if standby is not None else "master"
    print(
        "\nCommNG is starting (Ctrl-C stops everything):\n"
        f"  shape    {shape}\n"
        f"  replica  {replica}\n"
        f"  database 127.0.0.1:{state['endpoint_port']}, the endpoint (the RDS name): it serves the primary "
        f"127.0.0.1:{state['pg_port']}\n"
        f"  API      http://127.0.0.1:{port}/api/channels\n"
        f"  ready    http://127.0.0.1:{port}/readyz\n"
        f"  admin    http://127.0.0.1:{port}/admin/   (user admin, token {state['admin_token']})\n"
        f"  metrics  http://127.0.0.1:{port}/metrics   (Bearer <metrics_token in the state file>)\n"
        + (
            f"  login    IAM tokens: {iam_mode.HOSTNAME}:{state['iam_port']} checks each one (verify-full, "
            "devstack/iam_endpoint.py); no secret, no watcher\n"
            "  rotate   make rotate SECRET=master   (the master's; the service has no secret to rotate)\n"
            if state.get("auth") == "iam"
            else f"  rotate   make rotate   (the {service_secret(state)} secret; SECRET={others} for the "
            "others; in another terminal)\n"
        )
        + "  status   make status   (the server the endpoint serves, every worker's rotation state)\n"
        + (
            "  move     make switchover | make failover   (Blue/Green or Multi-AZ, to the standby)\n"
            if standby is not None
            else ""
        )
        + f'  CLI      eval "$({python} -m devstack env)"   then   flask --app wsgi rotation status\n',
        flush=True,
    )


def _run_against_environment(port: int) -> int:
    """DB_SECRET_ID or POSTGRES_* are set: migrate and serve against those, no local stack."""
    print("DB_SECRET_ID or POSTGRES_USER is set: using that database, not the local stack", flush=True)
    env = {"PORT": str(port), "LOG_FORMAT": "console", **os.environ}
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(METRICS_DIR))
    check_or_exit(env=env)
    return _migrate("upgrade", env) or _serve([], env, [])


def _migrate(command: str, env: Mapping[str, str]) -> int:
    """`flask db <command>`; 0, or its exit code after one line saying so.

    Without PROMETHEUS_MULTIPROC_DIR: a process that is not a gunicorn worker must not
    leave a file there (its gauges would count as a live worker's forever).
    """
    bindir = Path(sys.executable).parent
    migration_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    code = subprocess.run(
        [str(bindir / "flask"), "--app", "wsgi", "db", command], env=migration_env, cwd=ROOT, check=False
    ).returncode
    if code:
        print(f"the migration (flask --app wsgi db {command}) failed with exit code {code}", file=sys.stderr)
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
        **_STOPPED_BY_US,
    )
    processes.append(gunicorn)
    try:
        return gunicorn.wait()
    except KeyboardInterrupt:
        gunicorn.send_signal(signal.SIGTERM)
        return gunicorn.wait(timeout=40)


def _die_with_us() -> None:
    """In the child, before exec: SIGTERM when this process dies without stopping it (SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Popen arguments for the stack's long-lived children (gunicorn, moto). A terminal's Ctrl-C
# signals the whole foreground process group: gunicorn's master and workers would each quit
# at once (quickly, not gracefully), and moto would vanish under workers still stopping.
# In a group of their own only this process hears it, and stops them in order: gunicorn
# with SIGTERM (requests finish, worker_exit runs), then moto, then PostgreSQL (pg_ctl
# already starts it in a session of its own).
_STOPPED_BY_US: dict[str, Any] = {"process_group": 0, "preexec_fn": _die_with_us}


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


# -- env ------------------------------------------------------------------------------


def env_lines(which: str | None = None) -> list[str]:
    """The shell lines that point `flask --app wsgi rotation ...` at the running stack.

    ``which`` (app|master|replica) puts that secret in DB_SECRET_ID instead of the
    service's: ``--secret master`` is the DDL login ``make example`` creates its tables with.
    """
    owner, state = require_running()
    if which is None and state.get("auth") == "iam":
        # AUTH=iam: the CLI logs in as the service does, with an IAM token (no secret at all).
        login = iam_mode.service_env(aws_env(state), state)
        how = "# AUTH=iam: the CLI logs in with an IAM token, as the service does (no password anywhere)"
    else:
        which = which or service_secret(state)
        if which not in state["secrets"]:
            raise SystemExit(f"the local stack has no {which} secret (it has {', '.join(state['secrets'])})")
        replica = state["secrets"].get("replica")
        login = {
            **aws_env(state, which),
            # `rotation status` compares the replica's workers with the replica's own secret.
            **({"DB_REPLICA_SECRET_ID": replica} if replica else {}),
        }
        how = (
            f"# the database login is read from the local Secrets Manager ({SECRET_NAMES[which]}), "
            "as the service does"
        )
    variables = {
        **login,
        "PORT": str(owner.get("port", 8000)),
        # The CLI's own start-up lines (credentials found, fetched) are not the service's.
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "console",
    }
    return [
        f"# the local stack running as pid {owner.get('pid', '?')} (state in {LOCAL}), for "
        "`flask --app wsgi rotation status|check|history`",
        how,
        *(f"export {name}={shlex.quote(value)}" for name, value in variables.items()),
        # The CLI is not a gunicorn worker: it must not write the service's metrics files.
        "unset PROMETHEUS_MULTIPROC_DIR",
        "# ADMIN_TOKEN: the admin API's token, needed by `rotation check` only",
        f"export ADMIN_TOKEN={shlex.quote(state['admin_token'])}",
    ]


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong argument ends in one line like every other operator mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the local stack in the foreground")
    run_parser.add_argument("--port", type=int, default=None, help="gunicorn's port (default: $PORT or 8000)")
    run_parser.add_argument(
        "--shape",
        choices=SHAPES,
        default=None,
        help="the service's login: the app role (default) or the master",
    )
    run_parser.add_argument(
        "--replica",
        nargs="?",
        const="1",
        choices=("0", "1"),
        default=None,
        help="1 (or the bare flag): a hot standby with its own secret; 0: none (default: 1 in the app shape)",
    )
    run_parser.add_argument(
        "--auth",
        choices=("secret", "iam"),
        default=None,
        help="how the service logs in: a rotated secret (default) or IAM tokens (DB_AUTH=iam)",
    )
    rotate_parser = sub.add_parser("rotate", help="rotate one secret of the local stack as AWS does")
    rotate_parser.add_argument(
        "--secret",
        choices=("app", "master", "replica"),
        default=None,
        help="which secret (default: the one the service logs in with)",
    )
    rotate_parser.add_argument(
        "--pause", type=float, default=5.0, help="seconds inside a single-user rotation's window"
    )
    env_parser = sub.add_parser(
        "env",
        help="print `export` lines for the flask CLI against the running stack; "
        "they include the admin token (ADMIN_TOKEN, for `rotation check`) in plain text",
        description='eval "$(.venv/bin/python -m devstack env)" sets the environment of '
        "`flask --app wsgi rotation ...` for the running local stack. The output includes "
        "ADMIN_TOKEN in plain text (needed by `rotation check`); the database password is not "
        "printed: the CLI reads it from the local Secrets Manager.",
    )
    env_parser.add_argument(
        "--secret",
        choices=("app", "master", "replica"),
        default=None,
        help="the secret in DB_SECRET_ID (default: the one the service logs in with)",
    )
    failover_parser = sub.add_parser(
        "failover", help="crash the primary; the endpoint refuses, then serves the promoted standby"
    )
    failover_parser.add_argument(
        "--stale", type=float, default=3.0, help="seconds the endpoint refuses connections (stale DNS)"
    )
    switchover_parser = sub.add_parser(
        "switchover", help="Blue/Green: the primary turns read-only, the standby catches up and is served"
    )
    switchover_parser.add_argument(
        "--read-only", type=float, default=1.0, help="seconds the primary is read-only at least"
    )
    sub.add_parser("where", help="which server the endpoint serves, and the standby's replication")
    args = parser.parse_args(argv)
    if args.command == "env":
        print("\n".join(env_lines(args.secret)))
        return 0
    # A closed terminal (SIGHUP), `kill` (SIGTERM) and Ctrl-C all stop the stack cleanly, also
    # when a shell started us in the background with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if args.command == "run":
        if args.port is None:
            check_or_exit(["PORT"])
        replica = None if args.replica is None else args.replica == "1"
        return run(args.port or int(os.environ.get("PORT") or 8000), args.shape, replica, args.auth)
    if args.command == "failover":
        return topology.move("failover", stale_s=args.stale)
    if args.command == "switchover":
        return topology.move("switchover", read_only_s=args.read_only)
    if args.command == "where":
        print("\n".join(topology.describe()))
        return 0
    return rotate(args.secret, args.pause)


if __name__ == "__main__":
    sys.exit(main())
