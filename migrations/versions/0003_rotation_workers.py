"""Fleet view: one row per worker and bind, upserted after every check (issue 13).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotation_workers",
        # host:pid, as in rotation_events.worker.
        sa.Column("worker", sa.Text(), primary_key=True),
        # The bind's name; "" is the default engine.
        sa.Column("bind", sa.Text(), primary_key=True),
        sa.Column("current_version", sa.Text(), nullable=True),
        sa.Column("last_check_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_refresh_at", sa.DateTime(timezone=True), nullable=True),
        # The database's clock: tasks' clocks may differ, and age-out compares with now().
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_rotation_workers_updated_at", "rotation_workers", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_rotation_workers_updated_at", table_name="rotation_workers")
    op.drop_table("rotation_workers")
