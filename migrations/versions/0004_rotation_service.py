"""Rotation history and fleet rows carry their service: several apps may share one database.

The rotation layer writes ``RotationSettings.service`` into every row and reads, prunes and
ages out only its own. Rows written before this migration are CommNG's.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("rotation_events", "rotation_workers"):
        op.add_column(table, sa.Column("service", sa.Text(), nullable=False, server_default="commng"))
        op.alter_column(table, "service", server_default=None)
    op.drop_index("ix_rotation_events_occurred_at", table_name="rotation_events")
    op.create_index(
        "ix_rotation_events_service_occurred_at",
        "rotation_events",
        ["service", sa.text("occurred_at DESC"), sa.text("id DESC")],
    )
    op.drop_constraint("rotation_workers_pkey", "rotation_workers", type_="primary")
    op.create_primary_key("rotation_workers_pkey", "rotation_workers", ["service", "worker", "bind"])


def downgrade() -> None:
    op.drop_constraint("rotation_workers_pkey", "rotation_workers", type_="primary")
    op.execute("DELETE FROM rotation_workers WHERE service <> 'commng'")
    op.create_primary_key("rotation_workers_pkey", "rotation_workers", ["worker", "bind"])
    op.drop_index("ix_rotation_events_service_occurred_at", table_name="rotation_events")
    op.create_index(
        "ix_rotation_events_occurred_at", "rotation_events", [sa.text("occurred_at DESC"), sa.text("id DESC")]
    )
    for table in ("rotation_events", "rotation_workers"):
        op.drop_column(table, "service")
