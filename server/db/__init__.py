"""Metadata datastore: ORM tables, engines, sessions and migrations (no FastAPI)."""

from __future__ import annotations

from segassist.server.db.session import make_engine, migrate, session_factory
from segassist.server.db.tables import (
    Base,
    Dataset,
    Image,
    Job,
    JobKind,
    JobStatus,
    Label,
    ModelKind,
    ModelRecord,
)

__all__ = [
    "Base",
    "Dataset",
    "Image",
    "Job",
    "JobKind",
    "JobStatus",
    "Label",
    "ModelKind",
    "ModelRecord",
    "make_engine",
    "migrate",
    "session_factory",
]
