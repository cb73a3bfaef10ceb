"""Alembic environment: migrations run through the app's own engine.

That engine takes its password at connect time (EngineFactory), so no password is
ever rendered into a URL or into Alembic's config.
"""

from alembic import context
from flask import current_app

from commng_rotation import bounds, history

MIGRATION_DEADLINE_S = 3600

target_db = current_app.extensions["migrate"].db
# The app's models and the rotation history table (which keeps a metadata of its own).
target_metadata = [target_db.metadata, history.metadata]


def run_migrations_offline() -> None:
    """Emit SQL without a connection (``flask db upgrade --sql``)."""
    context.configure(
        url="postgresql://",
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply migrations on a connection from the app's current engine.

    The app's connections carry a 5 s statement timeout and bounded waits; a migration may
    legitimately run longer (an index on a large table), so it gets an hour instead.

    ``-x role=<name>`` (``flask db bootstrap`` passes its owner role) runs the migrations
    under ``SET LOCAL ROLE``, so every table, index and sequence they create belongs to
    that role rather than to the login that connected.
    """
    role = context.get_x_argument(as_dictionary=True).get("role")
    with bounds.deadline(MIGRATION_DEADLINE_S), target_db.engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            # Inside alembic's transaction: a statement before it would begin one that
            # alembic then leaves uncommitted.
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {MIGRATION_DEADLINE_S * 1000}")
            if role:
                quoted = connection.dialect.identifier_preparer.quote_identifier(role)
                connection.exec_driver_sql(f"SET LOCAL ROLE {quoted}")
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
