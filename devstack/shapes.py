"""What each shape of the local stack is made of: roles, database, standby, secrets, migration.

The shapes of docs/deployment-shapes.md, with PostgreSQL's superuser standing in for what
Terraform and RDS do:

- ``app`` (the default, as the Terraform's): ``commng_master`` stands in for RDS's master
  (LOGIN CREATEROLE CREATEDB, owns the database, not a superuser). ``flask db bootstrap``
  runs with the master secret and creates ``commng_owner`` (NOLOGIN, owns the tables),
  ``commng_app``/``commng_app_clone`` from the app secret and, with a replica,
  ``commng_ro`` from the replica secret. The service logs in with the app secret.
- ``master``: shape 1 of docs/deployment-shapes.md. The service logs in with the master secret and
  migrates with ``flask db upgrade``.
- the replica (app shape only, as in infra/): a hot standby made by ``pg_basebackup -R``,
  read as ``commng_ro`` through a secret whose ``host``/``port`` are the standby's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Mapping
from typing import Any

from psycopg2 import sql

from devstack.postgres import PostgresCluster, make_standby
from devstack.stack import (
    APP_ROLE,
    DATABASE,
    MASTER_ROLE,
    OWNER_ROLE,
    READER_ROLE,
    SECRET_NAMES,
    standby_base,
)

__all__ = [
    "adopt_promoted",
    "create_secrets",
    "describe",
    "discard_standby",
    "migration",
    "prepare_database",
    "start_standby",
]


def prepare_database(cluster: PostgresCluster, shape: str, passwords: Mapping[str, str]) -> None:
    """The master login and its database; this run's passwords for the logins that exist.

    A database another layout made is recreated empty, with one line saying why: the one-role
    layout of earlier versions (``commng_app`` owned everything), or, for the app shape,
    tables that belong to a role other than ``commng_owner`` (the master shape's migrations),
    which the app role could not be granted.
    """
    master = sql.Identifier(MASTER_ROLE)
    if not cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MASTER_ROLE,)):
        cluster.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB").format(master))
    found = cluster.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (DATABASE,))
    why = None
    if found and found[0][0] != MASTER_ROLE:
        why = f"belongs to {found[0][0]} (the one-role layout of an earlier make run)"
    elif found and shape == "app":
        strangers = sorted(_table_owners(cluster) - {OWNER_ROLE})
        if strangers:
            why = f"has tables of {', '.join(strangers)}, not of {OWNER_ROLE} (made by make run SHAPE=master)"
    if why:
        print(f"database {DATABASE} {why}: recreating it empty for SHAPE={shape}", flush=True)
        cluster.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
    if not found or why:
        cluster.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), master))
    # The secrets are new in each run's moto server: the logins that exist take their
    # passwords (the bootstrap creates the missing ones with them).
    for name, role in (("master", MASTER_ROLE), ("app", APP_ROLE), ("replica", READER_ROLE)):
        if cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
            cluster.set_password(role, passwords[name])


def _table_owners(cluster: PostgresCluster) -> set[str]:
    rows = cluster.execute(
        "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S')",
        dbname=DATABASE,
    )
    return {row[0] for row in rows}


def adopt_promoted(primary: PostgresCluster) -> None:
    """The standby that ``make failover``/``switchover`` promoted becomes the primary's data.

    Both servers are stopped; the old primary's data (crashed, or the switchover's blue) is
    removed and the promoted standby's moves into its place, so the run goes on as usual
    and makes a new standby from it.
    """
    promoted = standby_base() / "data"
    with contextlib.suppress(RuntimeError):
        PostgresCluster(promoted, 0, primary.superuser_password).stop("immediate")
    primary.stop("immediate")
    shutil.rmtree(primary.datadir)
    promoted.rename(primary.datadir)
    with open(primary.datadir / "postgresql.conf", "a") as conf:
        conf.write(f"\n# the primary again\nunix_socket_directories = '{primary.socket_dir}'\n")
    print(
        f"the standby promoted by the last make failover/switchover is the primary now ({primary.datadir}); "
        "a new standby is made from it",
        flush=True,
    )


def discard_standby(primary: PostgresCluster) -> None:
    """Each run makes its standby anew: stop and remove the previous one."""
    base = standby_base()
    # A stale postmaster.pid (nothing running) is no reason to stop: the folder goes anyway.
    with contextlib.suppress(RuntimeError):
        PostgresCluster(base / "data", 0, primary.superuser_password).stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


def start_standby(primary: PostgresCluster) -> PostgresCluster:
    """A hot standby of ``primary``, streaming and accepting reads; one line says how long it took."""
    started = time.monotonic()
    try:
        standby = make_standby(primary, standby_base())
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SystemExit(f"the standby did not start ({first}): make run REPLICA=0 runs without it") from None
    took = time.monotonic() - started
    print(f"standby: hot standby on 127.0.0.1:{standby.port}, ready in {took:.1f} s", flush=True)
    return standby


def create_secrets(
    client: Any,
    shape: str,
    passwords: Mapping[str, str],
    endpoint_port: int,
    standby: PostgresCluster | None,
    with_app: bool = True,
) -> dict[str, str]:
    """The secrets of ``shape``, shaped like infra/'s; returns their ARNs by name.

    The app's login names the endpoint (RDS's name for the primary, wherever it is); the
    replica's names the standby itself, as a read replica's own endpoint would.
    """

    def create(name: str, value: Mapping[str, Any]) -> str:
        arn: str = client.create_secret(Name=SECRET_NAMES[name], SecretString=json.dumps(value))["ARN"]
        return arn

    # What RDS manages for its master user: the username and password only.
    master = create("master", {"username": MASTER_ROLE, "password": passwords["master"]})
    arns = {"master": master}

    def login(role: str, name: str, port: int) -> dict[str, Any]:
        return {
            "engine": "postgres",
            "host": "127.0.0.1",
            "port": port,
            "dbname": DATABASE,
            "username": role,
            "password": passwords[name],
            "masterarn": master,
        }

    if not with_app:  # IAM tokens (AUTH=iam): only the master's, for the bootstrap, as on RDS
        return arns
    if shape == "app":
        arns["app"] = create("app", login(APP_ROLE, "app", endpoint_port))
    if standby is not None:
        arns["replica"] = create("replica", login(READER_ROLE, "replica", standby.port))
    return arns


def migration(shape: str, env: Mapping[str, str], arns: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """(``flask db`` subcommand, its environment): the app shape bootstraps as the master."""
    if shape != "app":
        return "upgrade", dict(env)
    return "bootstrap", {**env, "DB_SECRET_ID": arns["master"], "DB_APP_SECRET_ID": arns["app"]}


def describe(shape: str, standby: PostgresCluster | None) -> tuple[str, str]:
    """The banner's ``shape`` and ``replica`` lines."""
    if shape == "app":
        login = (
            f"app: the service logs in as {APP_ROLE} ({SECRET_NAMES['app']}, alternating users); "
            f"the tables belong to {OWNER_ROLE}"
        )
    else:
        login = f"master: the service logs in as {MASTER_ROLE} ({SECRET_NAMES['master']}, single user)"
    if standby is None:
        return login, "none"
    return login, f"hot standby 127.0.0.1:{standby.port}, read as {READER_ROLE} ({SECRET_NAMES['replica']})"
