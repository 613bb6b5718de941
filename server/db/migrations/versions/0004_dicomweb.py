"""DICOM sources: a dataset's DICOMweb server, an image's source and SeriesInstanceUID.

``datasets.dicomweb`` holds ``{"url", "username", "password"}`` of a dataset backed by a
DICOMweb server (null: files uploaded to segassist). ``images.source`` says where the stored
NIfTI came from (``nifti``, ``dicom`` = an uploaded series, ``dicomweb`` = fetched from the
dataset's server) and ``images.series_uid`` is the SeriesInstanceUID of the last two.

Revision ID: 0004_dicomweb
Revises: 0003_job_attempts
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_dicomweb"
down_revision = "0003_job_attempts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns; images stored before are NIfTI uploads as far as segassist knows."""
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("dicomweb", sa.JSON(), nullable=True))
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="nifti"))
        batch.add_column(sa.Column("series_uid", sa.String(64), nullable=True))
        batch.create_index("ix_images_series_uid", ["series_uid"])


def downgrade() -> None:
    """Drop the columns (a DICOMweb dataset becomes an ordinary one)."""
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_series_uid")
        batch.drop_column("series_uid")
        batch.drop_column("source")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("dicomweb")
