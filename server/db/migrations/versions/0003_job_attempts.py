"""Job heartbeat on the row: ``heartbeat_at`` and ``worker_id`` of the running attempt.

The attempt counter is the existing ``attempts`` column: a worker increments it when it starts a
job, and every later write of that worker is conditional on it (``worker/attempts.py``).

Revision ID: 0003_job_attempts
Revises: 0002_users_audit
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_attempts"
down_revision = "0002_users_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the heartbeat columns (empty for jobs that are not running)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("worker_id", sa.String(255), nullable=True))


def downgrade() -> None:
    """Drop the heartbeat columns."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker_id")
        batch.drop_column("heartbeat_at")
