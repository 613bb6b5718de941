"""SQLAlchemy 2.0 ORM tables of the datastore: datasets, images, labels, jobs, models.

Ids are uuid4 hex strings. Volumes and artifacts live on disk (see :mod:`segassist.server.storage`); rows
hold their metadata and checksums.

Label versioning: every upload is a new row with ``version`` = previous max + 1 for that image;
nothing is overwritten or deleted. At most one label per image carries the tag ``"final"``: saving
a new ``final`` re-tags the previous final as ``"previous"`` in the same transaction. Other tags
(e.g. ``"original"``, ``"draft"``) are free-form and may repeat.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from segassist.models.runtime.configs import IGNORE_INDEX

__all__ = [
    "FINAL_TAG",
    "ID_PATTERN",
    "IMAGE_SOURCES",
    "PREVIOUS_TAG",
    "AuditEvent",
    "Base",
    "Dataset",
    "Image",
    "Job",
    "JobKind",
    "JobStatus",
    "Label",
    "ModelKind",
    "ModelRecord",
    "Role",
    "User",
    "new_id",
    "utcnow",
]

FINAL_TAG = "final"
PREVIOUS_TAG = "previous"
IMAGE_SOURCES = ("nifti", "dicom", "dicomweb")
"""An image's ``source``: a NIfTI upload, an uploaded DICOM series, a series fetched by DICOMweb."""


ID_PATTERN = r"^[0-9a-f]{32}$"
"""Form of every id the service hands out: 32 lowercase hex digits (:func:`new_id`; the worker's
model ids are uuid5 hex). The API refuses any other id (they end up in file paths)."""


def new_id() -> str:
    """A fresh string id (uuid4 hex, 32 characters, :data:`ID_PATTERN`)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """Timezone-aware current UTC time."""
    return datetime.now(UTC)


class JobKind(enum.StrEnum):
    """What a job does; the Celery task name is ``segassist.<kind>``."""

    pretrain = "pretrain"
    finetune = "finetune"
    predict = "predict"
    assist = "assist"
    features = "features"
    refine = "refine"


class JobStatus(enum.StrEnum):
    """Life cycle of a job: queued → running → succeeded | failed | cancelled."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the job reached a terminal state."""
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ModelKind(enum.StrEnum):
    """Registry entry kind."""

    encoder = "encoder"
    segmenter = "segmenter"


class Base(DeclarativeBase):
    """Declarative base; ``Base.metadata`` is what the Alembic migrations create."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Stored as plain VARCHAR + values (no native PG enum): adding a value needs no migration.
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=_values)


def _values(cls: type[enum.StrEnum]) -> list[str]:
    return [m.value for m in cls]


class Dataset(Base):
    """A named collection of volumes sharing one modality and one label schema.

    ``labels`` maps class value (as a string, ``"1"``…) to ``{"name", "color"}``; 0 = background
    is implicit.
    """

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    modality: Mapped[str] = mapped_column(String(32))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dicomweb: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    """``{"url", "username", "password"}`` of the DICOMweb server backing the dataset (None:
    uploaded files); never logged or returned (:mod:`segassist.server.dicomweb`)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="dataset", passive_deletes=True)

    def label_values(self) -> set[int]:
        """Values allowed in a label volume: 0, the schema's classes and 255 (unannotated)."""
        return {0, IGNORE_INDEX, *(int(k) for k in self.labels)}


_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")
"""Distinct colours given to classes named by default (repeating beyond eight)."""


def default_schema(classes: Iterable[int]) -> dict[str, Any]:
    """A label schema naming each class ``class <i>`` with a distinct colour."""
    return {
        str(c): {"name": f"class {c}", "color": _PALETTE[(c - 1) % len(_PALETTE)]}
        for c in sorted(set(classes))
        if 0 < c < 255
    }


class Image(Base):
    """One stored volume (always a NIfTI on disk, whatever was uploaded)."""

    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    shape: Mapped[list[Any]] = mapped_column()
    spacing: Mapped[list[Any]] = mapped_column()
    affine: Mapped[list[Any]] = mapped_column()
    dtype: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(
        String(16), default=IMAGE_SOURCES[0], server_default=IMAGE_SOURCES[0]
    )
    """Where the NIfTI came from: one of :data:`IMAGE_SOURCES`."""
    series_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    """SeriesInstanceUID of a DICOM source (``dicom``, ``dicomweb``)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="images")
    labels: Mapped[list[Label]] = relationship(
        back_populates="image", passive_deletes=True, order_by="Label.version.desc()"
    )


class Label(Base):
    """One version of a label volume for an image (values: schema classes, 0, 255 = ignore)."""

    __tablename__ = "labels"
    __table_args__ = (
        Index("ix_labels_image_version", "image_id", "version", unique=True),
        # At most one "final" label per image (partial unique index; SQLite and PostgreSQL).
        Index(
            "ux_labels_one_final",
            "image_id",
            unique=True,
            sqlite_where=text("tag = 'final'"),
            postgresql_where=text("tag = 'final'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    tag: Mapped[str] = mapped_column(String(64), default=FINAL_TAG)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    classes_present: Mapped[list[Any]] = mapped_column(default=list)
    annotated_slices: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="labels")


class Job(Base):
    """A background job; this row (not Celery's result backend) is the status of record.

    ``progress`` holds ``{"step", "total", "loss", "eta_seconds", "phase"}`` as the worker
    reports it; ``result`` the job's outputs (e.g. ``{"encoder_id": …}``). ``attempts`` counts
    the deliveries that started the job: the running one is attempt ``attempts``, and its worker
    (``worker_id`` = ``"<host> <pid>"``) refreshes ``heartbeat_at`` while it runs; every write of
    a worker is conditional on its attempt (``worker/attempts.py``).
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_dataset_status", "dataset_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.queued
    )
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    celery_task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_by: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ModelRecord(Base):
    """Registry entry of a trained encoder or segmenter and its artifact folder.

    ``parent_id`` is the encoder a segmenter was fitted on (``None`` = random initialisation);
    ``lineage`` records dataset, objective, label ids and job id; ``folder`` is absolute.
    """

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_kind_modality", "kind", "modality"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[ModelKind] = mapped_column(_enum(ModelKind, "model_kind"))
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True, default=None
    )
    modality: Mapped[str] = mapped_column(String(32))
    objective: Mapped[str | None] = mapped_column(String(64), default=None)
    method: Mapped[str | None] = mapped_column(String(64), default=None)
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), default=None
    )
    job_id: Mapped[str | None] = mapped_column(String(32), default=None, unique=True)
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    folder: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Role(enum.StrEnum):
    """What a user may do; each role includes the ones before it (``viewer < annotator < admin``).

    ``viewer`` reads; ``annotator`` also uploads images and labels, starts jobs and cancels its
    own; ``admin`` does everything, including cancelling anyone's job and reading the audit log.
    """

    viewer = "viewer"
    annotator = "annotator"
    admin = "admin"

    @property
    def rank(self) -> int:
        """Position in ``viewer < annotator < admin``."""
        return list(Role).index(self)


class User(Base):
    """A person (or service) holding one bearer token; ``token_hash`` is its SHA-256 (hex).

    The token itself is shown once, when made, and never stored. A revoked user keeps its row
    (the audit log refers to it) and its token stops working.
    """

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class AuditEvent(Base):
    """One write request (POST, PUT, PATCH, DELETE) and its outcome, refused ones included.

    ``route`` is the matched route template (``/api/v1/jobs/{job_id}/cancel``; ``None`` when no
    route matched), ``path`` the concrete path; ``object_ids`` the request's path parameters
    (``{"job_id": …}``). ``user_id`` is ``None`` for the shared API token and for anonymous
    callers (``user_name`` then says which).
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_user_at", "user_name", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[str | None] = mapped_column(String(32), default=None)
    user_name: Mapped[str | None] = mapped_column(String(64), default=None)
    role: Mapped[str | None] = mapped_column(String(16), default=None)
    method: Mapped[str] = mapped_column(String(8))
    route: Mapped[str | None] = mapped_column(String(255), default=None)
    path: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(64), default=None)
    object_ids: Mapped[dict[str, Any]] = mapped_column(default=dict)
