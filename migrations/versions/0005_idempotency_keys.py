"""Idempotency keys: a POST sent again with the same Idempotency-Key writes nothing twice.

One row per key, written in the same transaction as what the POST created, holding the
request's fingerprint and what was created (its status and id), so that a repeat gets
the first answer. ``principal`` scopes keys to a caller: the API has no authentication
yet, so every key is the empty principal's until one exists.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("principal", sa.Text(), nullable=False, server_default=""),
        sa.Column("key", sa.Text(), nullable=False),
        # sha256 of the method, the path and the body.
        sa.Column("fingerprint", sa.LargeBinary(), nullable=False),
        # "message" or "channel", and its id; status NULL only inside the creating transaction.
        sa.Column("resource", sa.Text(), nullable=False),
        sa.Column("resource_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.SmallInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("principal", "key"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
