"""`flask --app wsgi db bootstrap`: the roles, grants and schema of a new database, idempotently.

It runs as the database's master login (the app's usual ``DB_SECRET_ID`` path, pointed at
the master secret) and leaves three kinds of role behind:

- the **owner** (``DB_OWNER_ROLE``, NOLOGIN): owns every table, index and sequence,
  because the migrations run under ``SET LOCAL ROLE <owner>``. Nobody logs in as it; the
  master is granted it so that it can ``SET ROLE`` for the next migration.
- the **app role** (the ``username`` of ``DB_APP_SECRET_ID``) and its ``<user>_clone``
  (``GRANT <user> TO <user>_clone``): the two logins Secrets Manager's alternating-users
  rotation switches between. The clone is created without a password (it cannot log in
  until the first rotation gives it one); AWS's rotation function creates it too when it
  is missing. Both may read and write rows of every table, now and in future tables
  (``ALTER DEFAULT PRIVILEGES FOR ROLE <owner>``), and may not create or drop anything.

Every step first looks whether it is needed, so a second run changes nothing and says so.
A password is never put in a log line or an error: the role's password goes to the
server as a SCRAM verifier computed here (``psycopg2.extensions.encrypt_password``), in a
``psycopg2.sql.Literal``, so not even the server's log of a failed statement holds it.
"""

from __future__ import annotations

from typing import Any

import click
import flask_migrate
import psycopg2
import sqlalchemy as sa
from flask import current_app
from flask.cli import with_appcontext
from psycopg2 import sql
from psycopg2.extensions import encrypt_password

from commng.db import db
from commng_rotation import InvalidSecret, SecretsUnavailable, describe_error, get_runtime
from commng_rotation.credentials import Credentials, SecretsManagerSource, make_secrets_client
from config import Settings

__all__ = ["CLONE_SUFFIX", "bootstrap", "bootstrap_command", "login_pair"]

CLONE_SUFFIX = "_clone"
SCHEMA = "public"
TABLE_PRIVILEGES = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
SEQUENCE_PRIVILEGES = sql.SQL("USAGE, SELECT")


def login_pair(username: str) -> tuple[str, str]:
    """(app role, its clone) for either login of an alternating-users secret."""
    base = username.removesuffix(CLONE_SUFFIX) or username
    return base, base + CLONE_SUFFIX


class _Step:
    """Runs the statements of one bootstrap on one psycopg2 connection, noting what changed."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.changes: list[str] = []
        self.where = "connecting"

    def rows(self, query: Any, params: tuple[Any, ...] = ()) -> list[Any]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall()) if cur.description else []

    def run(self, statement: Any) -> None:
        with self.conn.cursor() as cur:
            cur.execute(statement)

    def role_exists(self, role: str) -> bool:
        return bool(self.rows("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)))

    def is_member(self, member: str, role: str) -> bool:
        return bool(
            self.rows(
                "SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                "JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = %s AND u.rolname = %s",
                (role, member),
            )
        )

    def privileges(self) -> list[Any]:
        """Every ACL bootstrap grants into: compared before and after to say whether it changed."""
        return self.rows(
            "SELECT 'database'::text, datacl::text FROM pg_database WHERE datname = current_database() "
            "UNION ALL SELECT 'schema'::text, nspacl::text FROM pg_namespace WHERE nspname = %s "
            "UNION ALL SELECT c.relname::text, c.relacl::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'S') "
            "UNION ALL SELECT 'default ' || d.defaclobjtype::text, d.defaclacl::text FROM pg_default_acl d "
            "ORDER BY 1, 2",
            (SCHEMA, SCHEMA),
        )

    def revision(self) -> str | None:
        if not self.rows("SELECT to_regclass('public.alembic_version')")[0][0]:
            return None
        found = self.rows("SELECT version_num FROM alembic_version")
        return str(found[0][0]) if found else None


def bootstrap(app_login: Credentials, owner: str, reader: Credentials | None = None) -> list[str]:
    """Create what is missing for ``app_login``, ``owner`` and ``reader``; return what changed.

    ``reader`` is the replica's login (``DB_REPLICA_SECRET_ID``): a LOGIN role that may only
    SELECT. It is created on the primary; physical replication carries it to the replica.
    """
    base, clone = login_pair(app_login.username)
    raw = db.engine.raw_connection()
    try:
        step = _Step(raw.driver_connection)
        try:
            _roles_and_grants(step, app_login, base, clone, owner)
            step.conn.commit()
            step.where = "running the migrations"
            before = step.revision()
            step.conn.commit()
            flask_migrate.upgrade(x_arg=[f"role={owner}"])
            after = step.revision()
            if after != before:
                step.changes.append(f"migrated the schema from {before or 'nothing'} to {after} as {owner}")
            step.where = "granting table privileges"
            acl = step.privileges()
            _table_grants(step, base, owner)
            if reader is not None:
                _reader(step, reader, owner)
            if step.privileges() != acl:
                step.changes.append(f"granted {base} read and write on {owner}'s tables and sequences")
            step.conn.commit()
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            step.conn.rollback()
            raise click.ClickException(
                f"bootstrap failed while {step.where}: {describe_error(exc)}"
            ) from None
    finally:
        raw.close()
    return step.changes


def _roles_and_grants(step: _Step, app_login: Credentials, base: str, clone: str, owner: str) -> None:
    step.where = "reading the database"
    master, database = step.rows("SELECT session_user, current_database()")[0]
    acl = step.privileges()
    step.where = "creating roles"
    if not step.role_exists(owner):
        step.run(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        step.changes.append(f"created role {owner} (NOLOGIN)")
    for role in (base, clone):
        if step.role_exists(role):
            continue
        if role == app_login.username:
            # The verifier, not the password, is what the server stores and all it ever sees.
            verifier = encrypt_password(app_login.password, role, step.conn, "scram-sha-256")
            step.run(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(verifier)
                )
            )
            step.changes.append(f"created role {role} (LOGIN, the app secret's password)")
        else:
            step.run(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            step.changes.append(f"created role {role} (LOGIN, no password until a rotation sets one)")
    step.where = "granting role memberships"
    for member, role in ((clone, base), (master, owner)):
        if not step.is_member(member, role):
            step.run(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(member)))
            step.changes.append(f"granted {role} to {member}")
    step.where = "granting database and schema privileges"
    schema = sql.Identifier(SCHEMA)
    step.run(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), sql.Identifier(base))
    )
    step.run(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(base)))
    step.run(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(schema, sql.Identifier(owner)))
    if step.privileges() != acl:
        step.changes.append(f"granted {base} CONNECT and USAGE, {owner} CREATE on schema {SCHEMA}")


def _table_grants(step: _Step, base: str, owner: str) -> None:
    """As the owner: rows of every table and sequence to the app role, now and in future."""
    schema, app, own = sql.Identifier(SCHEMA), sql.Identifier(base), sql.Identifier(owner)
    step.run(sql.SQL("SET LOCAL ROLE {}").format(own))
    step.run(sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(TABLE_PRIVILEGES, schema, app))
    step.run(sql.SQL("GRANT {} ON ALL SEQUENCES IN SCHEMA {} TO {}").format(SEQUENCE_PRIVILEGES, schema, app))
    for privileges, kind in ((TABLE_PRIVILEGES, "TABLES"), (SEQUENCE_PRIVILEGES, "SEQUENCES")):
        step.run(
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON {} TO {}").format(
                own, schema, privileges, sql.SQL(kind), app
            )
        )


def _reader(step: _Step, login: Credentials, owner: str) -> None:
    """The replica's login: created with its secret's password, SELECT on the owner's tables only."""
    step.where = "creating the read-only role"
    role, schema, own = sql.Identifier(login.username), sql.Identifier(SCHEMA), sql.Identifier(owner)
    step.run(sql.SQL("RESET ROLE"))  # back to the master: the owner may not create roles
    if not step.role_exists(login.username):
        verifier = encrypt_password(login.password, login.username, step.conn, "scram-sha-256")
        step.run(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(verifier)))
        step.changes.append(
            f"created role {login.username} (LOGIN, SELECT only, the replica secret's password)"
        )
    database = step.rows("SELECT current_database()")[0][0]
    step.run(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role))
    step.run(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role))
    step.run(sql.SQL("SET LOCAL ROLE {}").format(own))
    step.run(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(schema, role))
    step.run(
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
            own, schema, role
        )
    )


def _app_login(settings: Settings) -> Credentials:
    if not settings.db_app_secret_id:
        raise click.ClickException("DB_APP_SECRET_ID must name the app secret whose login bootstrap creates")
    return _secret_login(settings.db_app_secret_id, "app")


def _reader_login(settings: Settings) -> Credentials | None:
    return _secret_login(settings.db_replica_secret_id, "replica") if settings.db_replica_secret_id else None


def _secret_login(secret_id: str, what: str) -> Credentials:
    runtime = get_runtime()
    source = runtime.rotator().source
    client = (
        source.client if isinstance(source, SecretsManagerSource) else make_secrets_client(runtime.settings)
    )
    try:
        return SecretsManagerSource(client, secret_id, runtime.settings).fetch().credentials
    except (SecretsUnavailable, InvalidSecret) as exc:
        raise click.ClickException(f"cannot read the {what} secret: {exc}") from None


@click.command("bootstrap")
@with_appcontext
def bootstrap_command() -> None:
    """Create the owner and app roles, migrate as the owner, grant the app role its rows. Idempotent."""
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    changes = bootstrap(_app_login(settings), settings.db_owner_role, _reader_login(settings))
    for change in changes:
        click.echo(change)
    if not changes:
        click.echo("nothing to change: roles, grants and schema are already in place")
