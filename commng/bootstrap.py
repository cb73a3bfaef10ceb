"""`flask --app wsgi db bootstrap`: the roles, grants and schema of a new database, idempotently.

``bootstrap()`` does the work in the database, given the logins to create; the command
(``commng.cli``) reads them from the settings and the secrets, and prints what changed.
It runs as the database's master login (the app's usual ``DB_SECRET_ID`` path, pointed at
the master secret) and leaves three kinds of role behind:

- the **owner** (``DB_OWNER_ROLE``, NOLOGIN): owns every table, index and sequence,
  because the migrations run under ``SET LOCAL ROLE <owner>``. Nobody logs in as it; the
  master is granted it so that it can ``SET ROLE`` for the next migration.
- with IAM database authentication (``DB_APP_IAM_USER`` instead of ``DB_APP_SECRET_ID``),
  the **app role** alone, with no password, granted RDS's ``rds_iam`` (RDS then accepts
  only IAM tokens for it): nothing rotates, so there is no clone. ``rds_iam`` exists only
  on RDS; bootstrap creates nothing AWS-specific and stops, in one line, where it is missing.
- the **app role** (the ``username`` of ``DB_APP_SECRET_ID``) and its ``<user>_clone``
  (``GRANT <user> TO <user>_clone``): the two logins Secrets Manager's alternating-users
  rotation switches between. The clone is created without a password (it cannot log in
  until the first rotation gives it one); AWS's rotation function creates it too when it
  is missing. Both may read and write rows of every table, now and in future tables
  (``ALTER DEFAULT PRIVILEGES FOR ROLE <owner>``), and may not create or drop anything.
- with a replica, the **read-only role** (the ``username`` of ``DB_REPLICA_SECRET_ID``) and
  its ``<user>_clone``, made the same way: the replica secret alternates between them too
  (AWS's single-user function cannot rotate it: it sets the password as the user itself at
  the secret's host, the replica, which refuses ``ALTER ROLE``). Both may only SELECT.

A database the service used to log in to as the master (shape 1 of docs/deployment-shapes.md), or
as a former app login, already holds tables owned by that login. Bootstrap gives every
table, view and sequence of the schema to the owner, so that the next migration (run as
the owner) can alter them and the owner's grants apply; and a database owned by one of
the app's logins goes to the master, since its owner owns the schema and may create
tables in it. ``ALTER ... OWNER`` needs the master to act as the current owner: when it
cannot yet, it is made a member of that role for the transaction only.

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
import psycopg2.errors
import sqlalchemy as sa
from psycopg2 import sql
from psycopg2.extensions import encrypt_password

from commng.db import db
from commng_rotation import Credentials, describe_error

__all__ = ["CLONE_SUFFIX", "bootstrap", "login_pair"]

CLONE_SUFFIX = "_clone"
SCHEMA = "public"
TABLE_PRIVILEGES = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
SEQUENCE_PRIVILEGES = sql.SQL("USAGE, SELECT")
# The relations of the schema the owner must own (pg_class.relkind), and the ALTER for each.
# Indexes follow their table; a serial or identity sequence follows its table too.
OWNED_KINDS = {
    "r": "TABLE",
    "p": "TABLE",
    "f": "FOREIGN TABLE",
    "v": "VIEW",
    "m": "MATERIALIZED VIEW",
    "S": "SEQUENCE",
}


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
        """Whether ``member`` has ``role``'s privileges (inherits them), not only a catalog row.

        From PostgreSQL 16 a CREATEROLE login that creates a role is granted it with
        ADMIN only (no INHERIT, no SET): a row in pg_auth_members that gives neither
        ``SET ROLE`` nor the privileges, which ``pg_has_role(..., 'USAGE')`` does not count.
        """
        return bool(self.rows("SELECT pg_has_role(%s, %s, 'USAGE')", (member, role))[0][0])

    def acts_as(self, role: str) -> bool:
        """Whether the login has ``role``'s privileges (is it, inherits it, or is a superuser)."""
        return bool(self.rows("SELECT pg_has_role(session_user, %s, 'USAGE')", (role,))[0][0])

    def not_owned_by(self, owner: str, kinds: str) -> list[tuple[str, str, str]]:
        """(name, relkind, owner) of the schema's relations of ``kinds`` that ``owner`` does not own."""
        return [
            (str(name), str(kind), str(current))
            for name, kind, current in self.rows(
                "SELECT c.relname, c.relkind::text, pg_get_userbyid(c.relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind::text = ANY(%s) AND pg_get_userbyid(c.relowner) <> %s "
                "ORDER BY c.relname",
                (SCHEMA, list(kinds), owner),
            )
        ]

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


def bootstrap(
    app_login: Credentials, owner: str, reader: Credentials | None = None, iam: bool = False
) -> list[str]:
    """Create what is missing for ``app_login``, ``owner`` and ``reader``; return what changed.

    ``iam``: the app login logs in with IAM tokens (no password, ``rds_iam``, no clone).

    ``reader`` is the replica's login (``DB_REPLICA_SECRET_ID``): a LOGIN role that may only
    SELECT, and its clone. They are created on the primary; physical replication carries
    them to the replica.
    """
    base, clone = login_pair(app_login.username)
    raw = db.engine.raw_connection()
    try:
        step = _Step(raw.driver_connection)
        try:
            _roles_and_grants(step, app_login, base, None if iam else clone, owner, reader)
            _take_over_relations(step, owner)
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
        except click.ClickException:
            step.conn.rollback()
            raise
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            step.conn.rollback()
            raise click.ClickException(
                f"bootstrap failed while {step.where}: {describe_error(exc)}"
            ) from None
    finally:
        raw.close()
    return step.changes


def _roles_and_grants(
    step: _Step, app_login: Credentials, base: str, clone: str | None, owner: str, reader: Credentials | None
) -> None:
    step.where = "reading the database"
    master, database = step.rows("SELECT session_user, current_database()")[0]
    step.where = "creating roles"
    if not step.role_exists(owner):
        step.run(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        step.changes.append(f"created role {owner} (NOLOGIN)")
    if clone is None:
        _iam_login(step, base)
    else:
        _login_pair(step, app_login, base, clone, "the app secret's password")
    step.where = "granting role memberships"
    for member, role in ((clone, base), (master, owner)):
        if member is not None:
            _grant_membership(step, role, member)
    # Before the grants: only the database's owner may grant on it and on its schema.
    readers = login_pair(reader.username) if reader else ()
    _take_over_database(step, master, database, {base, clone or base, *readers})
    acl = step.privileges()
    step.where = "granting database and schema privileges"
    schema = sql.Identifier(SCHEMA)
    step.run(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), sql.Identifier(base))
    )
    step.run(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(base)))
    step.run(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(schema, sql.Identifier(owner)))
    if step.privileges() != acl:
        step.changes.append(f"granted {base} CONNECT and USAGE, {owner} CREATE on schema {SCHEMA}")


def _login_pair(step: _Step, login: Credentials, base: str, clone: str, password_from: str) -> None:
    """Create what is missing of ``base`` and ``clone``: the one ``login`` names with its password."""
    for role in (base, clone):
        if step.role_exists(role):
            continue
        if role == login.username:
            # The verifier, not the password, is what the server stores and all it ever sees.
            verifier = encrypt_password(login.password, role, step.conn, "scram-sha-256")
            step.run(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(verifier)
                )
            )
            step.changes.append(f"created role {role} (LOGIN, {password_from})")
        else:
            step.run(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            step.changes.append(f"created role {role} (LOGIN, no password until a rotation sets one)")


def _iam_login(step: _Step, role: str) -> None:
    """``role`` as a LOGIN without a password, granted ``rds_iam``: RDS's IAM authentication."""
    if not step.role_exists("rds_iam"):
        raise click.ClickException(
            "role rds_iam does not exist: IAM database authentication (DB_APP_IAM_USER) needs RDS "
            "for PostgreSQL with iam_database_authentication_enabled"
        )
    if not step.role_exists(role):
        step.run(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        step.changes.append(f"created role {role} (LOGIN, IAM authentication: no password)")
    _grant_membership(step, "rds_iam", role)


def _grant_membership(step: _Step, role: str, member: str) -> None:
    if not step.is_member(member, role):
        step.run(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(member)))
        step.changes.append(f"granted {role} to {member}")


def _borrow(step: _Step, role: str, what: str, new_owner: str) -> bool:
    """Let the login act as ``role``, the owner of ``what``; True when that took a GRANT to undo.

    ALTER ... OWNER is allowed to a login that has the current owner's privileges. An RDS
    master is not a superuser: for a role it is not yet a member of (a former app login),
    it grants itself the membership, which CREATEROLE allows for any non-superuser role.
    """
    if step.acts_as(role):
        return False
    master = step.rows("SELECT session_user")[0][0]
    try:
        step.run(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(master)))
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise click.ClickException(
            f"cannot take over {what} from {role}: {master} is not a member of {role} and cannot become "
            f"one ({exc.diag.message_primary}); as {role}, ALTER it OWNER TO {new_owner}, then run "
            "bootstrap again"
        ) from None
    return True


def _give_back(step: _Step, borrowed: list[str]) -> None:
    master = step.rows("SELECT session_user")[0][0]
    for role in borrowed:
        step.run(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(role), sql.Identifier(master)))


def _alter_owner(step: _Step, kind: str, name: str, current: str, new_owner: str) -> None:
    """``ALTER <kind> <name> OWNER TO <new_owner>``; a refusal is a one-line error naming both."""
    try:
        step.run(
            sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(kind), sql.Identifier(name), sql.Identifier(new_owner)
            )
        )
    except psycopg2.errors.InsufficientPrivilege as exc:
        reason = exc.diag.message_primary
        raise click.ClickException(
            f"cannot give {kind.lower()} {name} (owned by {current}) to {new_owner}: {reason}"
        ) from None


def _take_over_database(step: _Step, master: str, database: str, logins: set[str]) -> None:
    """A database owned by one of the app's logins goes to the master.

    Its owner owns the ``public`` schema too (PostgreSQL 15's ``pg_database_owner``), so
    it could create and drop tables whatever the grants say. The local stack of old
    created ``comm_ng`` owned by ``commng_app``.
    """
    step.where = "taking over the database"
    current = step.rows("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    former = str(current[0][0])
    if former not in logins:
        return
    borrowed = _borrow(step, former, f"database {database}", master)
    _alter_owner(step, "DATABASE", database, former, master)
    _give_back(step, [former] if borrowed else [])
    step.changes.append(f"gave database {database} to {master}: its owner {former} is a login of the app")


def _take_over_relations(step: _Step, owner: str) -> None:
    """Every table, view and sequence of the schema owned by another role goes to ``owner``."""
    step.where = "giving the schema's tables to the owner"
    found = step.not_owned_by(owner, "".join(OWNED_KINDS))
    if not found:
        return
    owned: dict[str, list[str]] = {}
    for name, kind, current in found:
        owned.setdefault(current, []).append(f"{OWNED_KINDS[kind].lower()} {name}")
    borrowed = [former for former, labels in owned.items() if _borrow(step, former, labels[0], owner)]
    # Tables (and views) first: ALTER TABLE carries the table's own sequences with it, and
    # ALTER SEQUENCE on such a sequence is refused. The standalone ones come after.
    for name, kind, current in step.not_owned_by(owner, "".join(k for k in OWNED_KINDS if k != "S")):
        _alter_owner(step, OWNED_KINDS[kind], name, current, owner)
    for name, kind, current in step.not_owned_by(owner, "S"):
        _alter_owner(step, OWNED_KINDS[kind], name, current, owner)
    _give_back(step, borrowed)
    for former, labels in owned.items():
        step.changes.append(f"gave {owner} what {former} owned: {', '.join(labels)}")


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
    """The replica's logins and its clone, SELECT on the owner's tables only (granted to the base)."""
    step.where = "creating the read-only roles"
    base, clone = login_pair(login.username)
    role, schema, own = sql.Identifier(base), sql.Identifier(SCHEMA), sql.Identifier(owner)
    step.run(sql.SQL("RESET ROLE"))  # back to the master: the owner may not create roles
    _login_pair(step, login, base, clone, "SELECT only, the replica secret's password")
    _grant_membership(step, base, clone)
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
