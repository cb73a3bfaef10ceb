"""`flask db bootstrap` against the real PostgreSQL: roles, ownership, grants, idempotence.

Each test gets an empty database owned by a master login that is what RDS gives: not a
superuser, CREATEROLE, owner of the database. The master and app secrets live in moto.
Some tests first migrate it the old way, as one login that then owns every table (the
master of shape 1 in docs/deployment-shapes.md, or the local stack's former ``commng_app``), as a deployment
that moves to the least-privilege shape finds it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3
import flask_migrate
import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql

from commng.app import create_app
from commng.cli import bootstrap_command
from commng_rotation import get_runtime
from config import Settings
from devstack import PostgresCluster, new_password
from tests.helpers import assert_no_secrets

ROOT = Path(__file__).resolve().parent.parent
FLASK = [str(Path(sys.executable).parent / "flask"), "--app", "wsgi", "db", "bootstrap"]
_counter = itertools.count(1)


@dataclass
class Fresh:
    """An empty database, its RDS-like master login, and the names bootstrap should create."""

    cluster: PostgresCluster
    name: str
    master: str
    master_password: str
    owner: str
    app_user: str
    app_password: str

    @property
    def clone(self) -> str:
        return f"{self.app_user}_clone"

    def connect(self, user: str, password: str) -> Any:
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.cluster.port, dbname=self.name, user=user, password=password
        )
        conn.autocommit = True
        return conn

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self.cluster.execute(query, params, dbname=self.name)

    def settings(self, master_arn: str, app_arn: str) -> Settings:
        return Settings(
            postgres_host="127.0.0.1",
            postgres_port=self.cluster.port,
            postgres_db=self.name,
            postgres_ssl="disable",
            db_secret_id=master_arn,
            db_app_secret_id=app_arn,
            db_owner_role=self.owner,
            log_format="console",
        )

    def env(self, endpoint: str, master_arn: str, app_arn: str) -> dict[str, str]:
        return {
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.cluster.port),
            "POSTGRES_DB": self.name,
            "POSTGRES_SSL": "false",
            "LOG_FORMAT": "json",
            "DB_SECRET_ID": master_arn,
            "DB_APP_SECRET_ID": app_arn,
            "DB_OWNER_ROLE": self.owner,
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint,
        }

    def secrets(self, client: Any) -> tuple[str, str]:
        """(master ARN, app ARN), created in ``client``'s Secrets Manager."""
        master = client.create_secret(
            Name=f"master/{self.name}",
            SecretString=json.dumps({"username": self.master, "password": self.master_password}),
        )["ARN"]
        app = client.create_secret(
            Name=f"app/{self.name}",
            SecretString=json.dumps({"username": self.app_user, "password": self.app_password}),
        )["ARN"]
        return master, app


@pytest.fixture
def fresh(pg: PostgresCluster) -> Iterator[Fresh]:
    n = next(_counter)
    f = Fresh(pg, f"boot_{n}", f"master_{n}", new_password(), f"owner_{n}", f"bootapp_{n}", new_password())
    master = sql.Identifier(f.master)
    pg.execute(
        sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB PASSWORD {}").format(
            master, sql.Literal(f.master_password)
        )
    )
    pg.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(f.name), master))
    yield f
    pg.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(f.name)))
    for role in (f.clone, f.app_user, f"{f.app_user}_ro_clone", f"{f.app_user}_ro", f.owner, f.master):
        pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _catalog(f: Fresh) -> list[Any]:
    """Everything bootstrap may touch: roles (password verifiers too), memberships, ACLs, schema."""
    roles = f.cluster.execute(
        "SELECT rolname, rolcanlogin, rolpassword FROM pg_authid WHERE rolname = ANY(%s) ORDER BY 1",
        ([f.master, f.owner, f.app_user, f.clone],),
    )
    members = f.cluster.execute(
        "SELECT r.rolname, u.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
        "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = ANY(%s) ORDER BY 1, 2",
        ([f.master, f.app_user, f.clone],),
    )
    acls = f.rows(
        "SELECT c.relname, c.relowner::regrole::text, c.relacl::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' ORDER BY 1"
    )
    other = f.rows(
        "SELECT (SELECT datacl::text FROM pg_database WHERE datname = current_database()), "
        "(SELECT nspacl::text FROM pg_namespace WHERE nspname = 'public'), "
        "(SELECT array_agg(defaclacl::text ORDER BY defaclobjtype) FROM pg_default_acl), "
        "(SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()), "
        "(SELECT version_num FROM alembic_version)"
    )
    return [roles, members, acls, other]


def _cannot(conn: Any, statement: str) -> None:
    with pytest.raises(psycopg2.errors.InsufficientPrivilege), conn.cursor() as cur:
        cur.execute(statement)


def _can_use_rows(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO channels (name, created_at) VALUES ('boot', now()) RETURNING id")
        (channel,) = cur.fetchone()
        cur.execute(
            "INSERT INTO messages (channel_id, body, created_at) VALUES (%s, 'hi', now()) RETURNING id",
            (channel,),
        )
        cur.execute("UPDATE messages SET body = 'hello' WHERE channel_id = %s", (channel,))
        cur.execute("SELECT count(*) FROM messages WHERE channel_id = %s", (channel,))
        assert cur.fetchone() == (1,)
        cur.execute("DELETE FROM messages WHERE channel_id = %s", (channel,))
        cur.execute("DELETE FROM channels WHERE id = %s", (channel,))
        cur.execute("SELECT count(*) FROM rotation_events")


def test_bootstrap_creates_owner_app_and_clone_and_a_second_run_changes_nothing(
    fresh: Fresh, secretsmanager: Any, make_app: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    master_arn, app_arn = fresh.secrets(secretsmanager)
    settings = fresh.settings(master_arn, app_arn)
    app = make_app(settings, secrets_client=secretsmanager)
    runner = app.test_cli_runner()

    first = runner.invoke(bootstrap_command)

    assert first.exit_code == 0, first.output
    assert f"created role {fresh.owner} (NOLOGIN)" in first.output
    assert f"created role {fresh.app_user} (LOGIN" in first.output
    assert f"created role {fresh.clone} (LOGIN, no password" in first.output
    assert f"granted {fresh.owner} to {fresh.master}" in first.output
    assert "migrated the schema from nothing to" in first.output
    owners = {row[0] for row in fresh.rows("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
    assert owners == {fresh.owner}
    assert fresh.cluster.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (fresh.owner,)) == [
        (False,)
    ]

    app_conn = fresh.connect(fresh.app_user, fresh.app_password)
    try:
        _can_use_rows(app_conn)
        _cannot(app_conn, "CREATE TABLE intruder (id int)")
        _cannot(app_conn, "DROP TABLE messages")
        _cannot(app_conn, "ALTER TABLE channels ADD COLUMN x int")
    finally:
        app_conn.close()

    # The clone cannot log in until a rotation gives it a password; then it is the app role.
    with pytest.raises(psycopg2.OperationalError):
        fresh.connect(fresh.clone, "no password yet").close()
    clone_password = new_password()
    fresh.cluster.set_password(fresh.clone, clone_password)
    clone_conn = fresh.connect(fresh.clone, clone_password)
    try:
        _can_use_rows(clone_conn)
        _cannot(clone_conn, "CREATE TABLE intruder (id int)")
        _cannot(clone_conn, "DROP TABLE channels")
    finally:
        clone_conn.close()

    before = _catalog(fresh)
    second = runner.invoke(bootstrap_command)
    assert second.exit_code == 0, second.output
    assert second.output.strip() == "nothing to change: roles, grants and schema are already in place"
    assert _catalog(fresh) == before

    passwords = [fresh.app_password, fresh.master_password, clone_password]
    assert_no_secrets(first.output + second.output + caplog.text, passwords)
    assert_no_secrets(fresh.cluster.logfile.read_text(), [fresh.app_password])


def test_future_tables_of_the_owner_are_granted_by_default(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    master_arn, app_arn = fresh.secrets(secretsmanager)
    settings = fresh.settings(master_arn, app_arn)
    app = make_app(settings, secrets_client=secretsmanager)
    assert app.test_cli_runner().invoke(bootstrap_command).exit_code == 0
    # A later migration, as bootstrap runs it: the master under SET ROLE <owner>.
    master = fresh.connect(fresh.master, fresh.master_password)
    try:
        with master.cursor() as cur:
            cur.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(fresh.owner)))
            cur.execute("CREATE TABLE later (id bigserial PRIMARY KEY, v text)")
    finally:
        master.close()
    conn = fresh.connect(fresh.app_user, fresh.app_password)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO later (v) VALUES ('x') RETURNING id")
            cur.execute("DELETE FROM later")
        _cannot(conn, "DROP TABLE later")
    finally:
        conn.close()


def test_the_flask_command_line_bootstraps_once_then_does_nothing(fresh: Fresh, moto_endpoint: str) -> None:
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_endpoint)
    master_arn, app_arn = fresh.secrets(client)
    env = {**os.environ, **fresh.env(moto_endpoint, master_arn, app_arn)}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            FLASK, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
        )

    first, second = run(), run()

    assert first.returncode == 0, first.stderr[-2000:]
    assert f"created role {fresh.app_user}" in first.stdout
    assert second.returncode == 0, second.stderr[-2000:]
    assert "nothing to change" in second.stdout
    everything = first.stdout + first.stderr + second.stdout + second.stderr
    assert_no_secrets(everything, [fresh.app_password, fresh.master_password])


def test_with_a_replica_secret_bootstrap_creates_its_select_only_login(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    master_arn, app_arn = fresh.secrets(secretsmanager)
    reader, reader_password = f"{fresh.app_user}_ro", new_password()
    reader_arn = secretsmanager.create_secret(
        Name=f"replica/{fresh.name}",
        SecretString=json.dumps({"username": reader, "password": reader_password}),
    )["ARN"]
    settings = replace(fresh.settings(master_arn, app_arn), db_replica_secret_id=reader_arn)
    runner = make_app(settings, secrets_client=secretsmanager).test_cli_runner()

    first = runner.invoke(bootstrap_command)

    assert first.exit_code == 0, first.output
    assert f"created role {reader} (LOGIN, SELECT only" in first.output
    conn = fresh.connect(reader, reader_password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM channels")
            assert cur.fetchone() == (0,)
        _cannot(conn, "INSERT INTO channels (name, created_at) VALUES ('no', now())")
        _cannot(conn, "DELETE FROM messages")
        _cannot(conn, "CREATE TABLE intruder (id int)")
    finally:
        conn.close()
    second = runner.invoke(bootstrap_command)
    assert second.exit_code == 0, second.output
    assert "nothing to change" in second.output
    assert_no_secrets(
        first.output + second.output, [reader_password, fresh.app_password, fresh.master_password]
    )


# -- a database migrated the old way: one login owns every table ----------------------------


def _migrate_as(f: Fresh, user: str, password: str) -> None:
    """`flask db upgrade` as ``user`` (no owner role): ``user`` owns what the migrations create."""
    settings = replace(
        f.settings("", ""),
        db_secret_id=None,
        db_app_secret_id=None,
        postgres_user=user,
        postgres_password=password,
    )
    app = create_app(settings, configure_logging=False)
    try:
        with app.app_context():
            flask_migrate.upgrade()
    finally:
        get_runtime(app).stop()


def _owners(f: Fresh) -> set[str]:
    """The owners of every relation of the schema: tables, indexes, sequences, views."""
    rows = f.rows(
        "SELECT DISTINCT c.relowner::regrole::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
    )
    return {row[0] for row in rows}


def _next_migration_as_owner(f: Fresh) -> None:
    """What the next migration does, as bootstrap runs it: ALTER a table, move alembic_version."""
    master = f.connect(f.master, f.master_password)
    master.autocommit = False
    try:
        with master.cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(f.owner)))
            cur.execute("ALTER TABLE channels ADD COLUMN later int")
            cur.execute("CREATE INDEX ix_later ON channels (later)")
            cur.execute("UPDATE alembic_version SET version_num = 'later'")
        master.rollback()
    finally:
        master.close()


def test_a_database_the_master_migrated_is_given_to_the_owner(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    _migrate_as(fresh, fresh.master, fresh.master_password)
    assert _owners(fresh) == {fresh.master}
    master_arn, app_arn = fresh.secrets(secretsmanager)
    runner = make_app(fresh.settings(master_arn, app_arn), secrets_client=secretsmanager).test_cli_runner()

    first = runner.invoke(bootstrap_command)

    assert first.exit_code == 0, first.output
    took = f"gave {fresh.owner} what {fresh.master} owned: "
    assert took in first.output
    taken = first.output.split(took, 1)[1].splitlines()[0]
    for relation in ("table alembic_version", "table channels", "table messages", "sequence channels_id_seq"):
        assert relation in taken
    assert "migrated the schema" not in first.output  # it was at head already
    assert _owners(fresh) == {fresh.owner}
    _confined_and_settled(fresh, runner, first.output)


def _confined_and_settled(
    fresh: Fresh, runner: Any, first_output: str, also_refused: tuple[str, ...] = ()
) -> None:
    """After a takeover: the app role may use rows and nothing more, and a second run changes nothing."""
    app_conn = fresh.connect(fresh.app_user, fresh.app_password)
    try:
        _can_use_rows(app_conn)
        for statement in (
            "CREATE TABLE intruder (id int)",
            "DROP TABLE messages",
            "ALTER TABLE channels ADD COLUMN x int",
            *also_refused,
        ):
            _cannot(app_conn, statement)
    finally:
        app_conn.close()

    before = _catalog(fresh)
    second = runner.invoke(bootstrap_command)
    assert second.exit_code == 0, second.output
    assert second.output.strip() == "nothing to change: roles, grants and schema are already in place"
    assert _catalog(fresh) == before
    _next_migration_as_owner(fresh)
    assert_no_secrets(first_output + second.output, [fresh.app_password, fresh.master_password])


def test_the_old_app_login_that_owned_database_and_tables_becomes_the_app_role(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    # The local stack's former layout: the app login created by the superuser, owner of
    # the database, and the migrations run as it.
    app_user = sql.Identifier(fresh.app_user)
    fresh.cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(app_user, sql.Literal(fresh.app_password))
    )
    fresh.cluster.execute(
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(fresh.name), app_user)
    )
    _migrate_as(fresh, fresh.app_user, fresh.app_password)
    assert _owners(fresh) == {fresh.app_user}
    master_arn, app_arn = fresh.secrets(secretsmanager)
    runner = make_app(fresh.settings(master_arn, app_arn), secrets_client=secretsmanager).test_cli_runner()

    first = runner.invoke(bootstrap_command)

    assert first.exit_code == 0, first.output
    assert f"gave database {fresh.name} to {fresh.master}: its owner {fresh.app_user}" in first.output
    assert f"gave {fresh.owner} what {fresh.app_user} owned: " in first.output
    assert f"created role {fresh.app_user} (" not in first.output
    assert f"created role {fresh.clone} (LOGIN, no password" in first.output
    assert _owners(fresh) == {fresh.owner}
    assert fresh.rows("SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()") == [
        (fresh.master,)
    ]
    # The membership the master took to act as the old owner is gone again.
    assert fresh.rows("SELECT pg_has_role(%s, %s, 'MEMBER')", (fresh.master, fresh.app_user)) == [(False,)]
    _confined_and_settled(fresh, runner, first.output, also_refused=("CREATE SCHEMA intruder",))


def test_a_table_the_master_cannot_take_over_stops_bootstrap_in_one_line(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    fresh.rows("CREATE TABLE stray (id int)")  # as the superuser, whom an RDS master can never become
    master_arn, app_arn = fresh.secrets(secretsmanager)
    runner = make_app(fresh.settings(master_arn, app_arn), secrets_client=secretsmanager).test_cli_runner()

    result = runner.invoke(bootstrap_command)

    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(
        f"Error: cannot take over table stray from postgres: {fresh.master} is not a member of postgres"
    ), result.output
    assert f"ALTER it OWNER TO {fresh.owner}" in result.output
    # One transaction: the roles it had created are rolled back with it.
    assert fresh.cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (fresh.owner,)) == []
    assert_no_secrets(result.output, [fresh.app_password, fresh.master_password])


# -- the replica's login alternates too: its clone is created with it ---------------------------


def _reads_only(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM channels")
    _cannot(conn, "INSERT INTO channels (name, created_at) VALUES ('no', now())")
    _cannot(conn, "DELETE FROM messages")
    _cannot(conn, "CREATE TABLE intruder (id int)")


def _replica_secret(fresh: Fresh, secretsmanager: Any, username: str, password: str) -> str:
    arn: str = secretsmanager.create_secret(
        Name=f"replica/{fresh.name}", SecretString=json.dumps({"username": username, "password": password})
    )["ARN"]
    return arn


def test_bootstrap_creates_the_replica_logins_clone_which_reads_once_a_rotation_sets_its_password(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    """What AWS's alternating-users function expects of the replica secret's login, as of the app's."""
    master_arn, app_arn = fresh.secrets(secretsmanager)
    reader, reader_password = f"{fresh.app_user}_ro", new_password()
    reader_arn = _replica_secret(fresh, secretsmanager, reader, reader_password)
    settings = replace(fresh.settings(master_arn, app_arn), db_replica_secret_id=reader_arn)
    runner = make_app(settings, secrets_client=secretsmanager).test_cli_runner()

    first = runner.invoke(bootstrap_command)

    assert first.exit_code == 0, first.output
    assert f"created role {reader}_clone (LOGIN, no password until a rotation sets one)" in first.output
    assert f"granted {reader} to {reader}_clone" in first.output
    # The function's rotation: a new password for the clone, and the secret names it.
    clone_password = new_password()
    fresh.cluster.set_password(f"{reader}_clone", clone_password)
    conn = fresh.connect(f"{reader}_clone", clone_password)
    try:
        _reads_only(conn)
    finally:
        conn.close()
    secretsmanager.put_secret_value(
        SecretId=reader_arn,
        SecretString=json.dumps({"username": f"{reader}_clone", "password": clone_password}),
    )
    second = runner.invoke(bootstrap_command)
    assert second.exit_code == 0, second.output
    assert second.output.strip() == "nothing to change: roles, grants and schema are already in place"
    assert_no_secrets(first.output + second.output, [reader_password, clone_password, fresh.app_password])


def test_a_replica_secret_that_names_the_clone_gets_both_logins_and_grants_on_the_base(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    """A new database under a secret that rotated before: the clone logs in, the base holds the grants."""
    master_arn, app_arn = fresh.secrets(secretsmanager)
    reader, clone_password = f"{fresh.app_user}_ro", new_password()
    reader_arn = _replica_secret(fresh, secretsmanager, f"{reader}_clone", clone_password)
    settings = replace(fresh.settings(master_arn, app_arn), db_replica_secret_id=reader_arn)

    result = make_app(settings, secrets_client=secretsmanager).test_cli_runner().invoke(bootstrap_command)

    assert result.exit_code == 0, result.output
    assert f"created role {reader} (LOGIN, no password until a rotation sets one)" in result.output
    assert f"created role {reader}_clone (LOGIN, SELECT only, the replica secret's password)" in result.output
    conn = fresh.connect(f"{reader}_clone", clone_password)
    try:
        _reads_only(conn)
    finally:
        conn.close()
    granted = fresh.rows(
        "SELECT r.rolname FROM pg_class c, aclexplode(c.relacl) a JOIN pg_roles r ON r.oid = a.grantee "
        "WHERE c.relname = 'channels' AND a.privilege_type = 'SELECT' AND r.rolname IN (%s, %s)",
        (reader, f"{reader}_clone"),
    )
    assert granted == [(reader,)]


def test_with_iam_authentication_the_app_login_has_no_password_and_is_granted_rds_iam(
    fresh: Fresh, secretsmanager: Any, make_app: Any
) -> None:
    """DB_APP_IAM_USER: one login, no password, no clone, member of rds_iam (RDS's; a stand-in here)."""
    master_arn, _ = fresh.secrets(secretsmanager)
    settings = replace(fresh.settings(master_arn, ""), db_app_secret_id=None, db_app_iam_user=fresh.app_user)
    runner = make_app(settings, secrets_client=secretsmanager).test_cli_runner()

    missing = runner.invoke(bootstrap_command)  # not on RDS: no rds_iam, and nothing is created
    assert missing.exit_code != 0
    assert "role rds_iam does not exist" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not fresh.cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (fresh.app_user,))

    fresh.cluster.execute("CREATE ROLE rds_iam NOLOGIN")  # what RDS has
    try:
        first = runner.invoke(bootstrap_command)
        assert first.exit_code == 0, first.output
        assert f"created role {fresh.app_user} (LOGIN, IAM authentication: no password)" in first.output
        assert f"granted rds_iam to {fresh.app_user}" in first.output
        role = fresh.cluster.execute(
            "SELECT rolcanlogin, rolpassword IS NULL, pg_has_role(rolname, 'rds_iam', 'MEMBER') "
            "FROM pg_authid WHERE rolname = %s",
            (fresh.app_user,),
        )
        assert role == [(True, True, True)]
        assert not fresh.cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (fresh.clone,))
        # The app's rights on the rows are those of the secret modes.
        grants = fresh.rows(
            "SELECT has_table_privilege(%s, 'messages', 'INSERT'), "
            "has_table_privilege(%s, 'messages', 'TRUNCATE')",
            (fresh.app_user, fresh.app_user),
        )
        assert grants == [(True, False)]
        second = runner.invoke(bootstrap_command)
        assert second.output.strip() == "nothing to change: roles, grants and schema are already in place"
    finally:
        fresh.cluster.execute("DROP ROLE rds_iam")  # its memberships go with it
