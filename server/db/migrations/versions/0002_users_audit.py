"""Users with roles and hashed tokens, the audit log of writes, and who started each job.

Revision ID: 0002_users_audit
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_users_audit"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``users`` and ``audit_events``; add ``jobs.created_by``."""
    op.create_table(
        "users",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "role",
            sa.Enum("viewer", "annotator", "admin", name="user_role", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=True),
        sa.Column("user_name", sa.String(64), nullable=True),
        sa.Column("role", sa.String(16), nullable=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("route", sa.String(255), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(64), nullable=True),
        sa.Column("object_ids", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_user_at", "audit_events", ["user_name", "at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("created_by", sa.String(32), nullable=True))


def downgrade() -> None:
    """Drop the audit log, the users and ``jobs.created_by`` (their data is lost)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("created_by")
    op.drop_table("audit_events")
    op.drop_table("users")
