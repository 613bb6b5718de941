"""Request and response bodies of the REST API (``…Create`` in, ``…Public`` out)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    field_serializer,
    field_validator,
)

from segassist.models.runtime.configs import (
    DEFAULT_HEAD,
    IGNORE_INDEX,
    METHODS,
    OBJECTIVES,
    FewShotConfig,
    Method,
    Objective,
    PretrainConfig,
)
from segassist.server.db.tables import ID_PATTERN, JobKind, JobStatus, ModelKind
from segassist.server.dicomweb import DicomwebSettings

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "AssistCreate",
    "AuditEventPublic",
    "DatasetCreate",
    "DatasetPublic",
    "DicomwebPublic",
    "ErrorPublic",
    "FinetuneConfig",
    "FinetuneJobCreate",
    "FinetuneParams",
    "HealthPublic",
    "Id",
    "ImagePublic",
    "JobCreate",
    "JobProgress",
    "JobPublic",
    "LabelClass",
    "LabelPublic",
    "ModelPublic",
    "PredictJobCreate",
    "PredictParams",
    "PredictionCreate",
    "PredictionPublic",
    "PretrainJobCreate",
    "PretrainParams",
]

Id = Annotated[str, Field(pattern=ID_PATTERN)]
"""An id in a request body: 32 lowercase hex digits (``segassist.server.deps.IdPath`` in paths)."""
CLASS_VALUE = r"^0*([1-9][0-9]?|1[0-9]{2}|2[0-4][0-9]|25[0-4])$"
"""A class value of a label schema as a JSON key: ``"1"``…``"254"`` (leading zeros allowed)."""


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator("*", mode="after")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        """Times are stored in UTC; SQLite hands them back without a zone: put it back, so every
        answer is an RFC 3339 ``date-time`` (with ``+00:00``) on every database."""
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class LabelClass(BaseModel):
    """One class of a dataset's label schema."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    color: str = Field(default="#ff0000", pattern=r"^#[0-9a-fA-F]{6}$")


class DatasetCreate(BaseModel):
    """``POST /datasets``: class values are ``"1"``…``"254"`` (0 background, 255 unannotated).

    ``labels`` may be left empty: the first label volume saved then defines the schema (each
    class it holds, named ``class <i>``); afterwards values outside the schema are refused.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    modality: str = Field(min_length=1, max_length=32)
    labels: dict[str, LabelClass] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"pattern": CLASS_VALUE}}
    )
    dicomweb: DicomwebSettings | None = Field(
        default=None,
        description="back the dataset by this DICOMweb server (Orthanc, a PACS): its series "
        "become the dataset's images; the password is never returned",
    )

    @field_validator("labels")
    @classmethod
    def _class_values(cls, labels: dict[str, LabelClass]) -> dict[str, LabelClass]:
        bad = [k for k in labels if not re.fullmatch(CLASS_VALUE, k)]
        if bad:
            raise ValueError(
                f"label values must be integers 1..{IGNORE_INDEX - 1} "
                f"(0 is background, {IGNORE_INDEX} unannotated); got {bad}"
            )
        return {str(int(k)): v for k, v in labels.items()}


class DicomwebPublic(BaseModel):
    """A dataset's DICOMweb server as shown: the URL without user info, the user name."""

    model_config = ConfigDict(extra="ignore")

    url: str
    username: str = ""


class DatasetPublic(_Public):
    """A dataset with its label schema and number of images."""

    id: str
    name: str
    modality: str
    dicomweb: DicomwebPublic | None = None
    labels: dict[str, LabelClass]
    image_count: int
    created_at: datetime


class ImagePublic(_Public):
    """A stored volume: geometry exactly as uploaded, checksum of the stored NIfTI."""

    id: str
    dataset_id: str
    name: str
    shape: list[int]
    spacing: list[float]
    affine: list[list[float]]
    dtype: str
    sha256: str
    size_bytes: int
    label_status: Literal["unlabelled", "labelled"]
    final_label_id: str | None
    label_versions: int
    source: str = Field(
        default="nifti",
        description="nifti: a NIfTI upload; dicom: an uploaded DICOM series; dicomweb: a series "
        "of the dataset's DICOMweb server. Predictions of DICOM sources download as DICOM-SEG "
        "(GET /predictions/{model_id}/{image_id}/segmentation.dcm)",
    )
    series_uid: str | None = Field(default=None, description="SeriesInstanceUID of a DICOM source")
    created_at: datetime


class LabelPublic(_Public):
    """One label version: ``annotated_slices`` maps axis (``"0"``, ``"1"``, ``"2"``) to indices."""

    id: str
    image_id: str
    version: int
    tag: str
    sha256: str
    classes_present: list[int]
    annotated_slices: dict[str, list[int]]
    created_at: datetime


def _keys_set(config: BaseModel | None, info: SerializationInfo) -> dict[str, Any] | None:
    """A job's ``config`` as stored on its row: only the keys the user set, so the worker's
    defaults (e.g. :meth:`FewShotConfig.for_scratch` for a random encoder) fill in the rest."""
    return None if config is None else config.model_dump(mode=info.mode, exclude_unset=True)


class PretrainParams(BaseModel):
    """Params of a ``pretrain`` job (result ``{"encoder_id"}``).

    ``config`` holds :class:`PretrainConfig` fields; its ``objective`` and ``modality`` are the
    job's ``objective`` and the dataset's, and ``steps`` (when given) overrides its ``steps``.
    """

    model_config = ConfigDict(extra="forbid")

    objective: Objective
    image_ids: list[Id] | None = None
    steps: int | None = Field(default=None, gt=0)
    config: PretrainConfig | None = None

    @field_serializer("config")
    def _config_as_set(
        self, config: PretrainConfig | None, info: SerializationInfo
    ) -> dict[str, Any] | None:
        return _keys_set(config, info)


class FinetuneConfig(FewShotConfig):
    """``config`` of a ``finetune`` job: :class:`FewShotConfig` fields, plus ``encoder``.

    Attributes:
        encoder: :class:`PretrainConfig` fields of the random encoder the worker builds when
            ``encoder_id`` is null (e.g. its ``channels``); its ``modality`` is the dataset's.
    """

    encoder: PretrainConfig | None = None


class FinetuneParams(BaseModel):
    """Params of a ``finetune`` job (``encoder_id`` null = random initialisation)."""

    model_config = ConfigDict(extra="forbid")

    encoder_id: Id | None = None
    method: Method = "linear"
    label_ids: list[Id] | None = None
    config: FinetuneConfig | None = None

    @field_serializer("config")
    def _config_as_set(
        self, config: FinetuneConfig | None, info: SerializationInfo
    ) -> dict[str, Any] | None:
        return _keys_set(config, info)


class PredictParams(BaseModel):
    """Params of a ``predict`` job (``image_ids`` null = every image of the dataset)."""

    model_config = ConfigDict(extra="forbid")

    model_id: Id
    image_ids: list[Id] | None = None
    probabilities: bool = False


class _JobCreateBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: Id


class PretrainJobCreate(_JobCreateBase):
    """``POST /jobs`` of a ``pretrain`` job."""

    kind: Literal[JobKind.pretrain]
    params: PretrainParams


class FinetuneJobCreate(_JobCreateBase):
    """``POST /jobs`` of a ``finetune`` job (no params: a linear probe on a random encoder)."""

    kind: Literal[JobKind.finetune]
    params: FinetuneParams = Field(default_factory=FinetuneParams)


class PredictJobCreate(_JobCreateBase):
    """``POST /jobs`` of a ``predict`` job."""

    kind: Literal[JobKind.predict]
    params: PredictParams


JobCreate = Annotated[
    PretrainJobCreate | FinetuneJobCreate | PredictJobCreate, Field(discriminator="kind")
]
"""``POST /jobs``: one body per kind, told apart by ``kind`` (a ``oneOf`` with a discriminator in
the document), so each kind's params are validated and documented as that kind's. ``assist`` and
``features`` jobs are started by the server (``POST /datasets/{id}/assist``, uploads): 422 here."""


class JobProgress(BaseModel):
    """Progress as the worker last reported it."""

    step: int | None = None
    total: int | None = None
    loss: float | None = None
    eta_seconds: float | None = None
    phase: str | None = None


class JobPublic(_Public):
    """A job row: the status of record."""

    id: str
    kind: JobKind
    dataset_id: str
    status: JobStatus
    params: dict[str, Any]
    progress: JobProgress
    result: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class ModelPublic(_Public):
    """A registry entry (encoder or segmenter) with lineage and metrics."""

    id: str
    kind: ModelKind
    dataset_id: str | None
    modality: str
    objective: str | None
    method: str | None
    parent_id: str | None
    job_id: str | None
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime


class PredictionCreate(BaseModel):
    """``POST /models/{id}/predict``."""

    model_config = ConfigDict(extra="forbid")

    image_id: Id
    probabilities: bool = False


class PredictionPublic(BaseModel):
    """Where the outputs of a prediction can be downloaded.

    ``urls`` maps ``labels``, ``clusters``, ``clusters_png`` (and ``probabilities``,
    ``uncertainty`` when asked) to API paths.
    """

    model_id: str
    image_id: str
    urls: dict[str, str]


class HealthPublic(BaseModel):
    """``GET /health``: ``"ok"`` or an error message per dependency."""

    status: str
    database: str
    broker: str


class AssistCreate(BaseModel):
    """``POST /datasets/{id}/assist``: segment images from the labelled slices in one job.

    Everything is optional: by default every image's ``final`` labels train a probe head on the
    dataset's encoder (else the newest of the modality, else a short pretraining) and every
    image of the dataset is segmented. The slice axis and the classes come from the labels.
    """

    model_config = ConfigDict(
        extra="forbid",
        # Documents the cross-field rules (checked in segassist.server.assist): objective "none"
        # (random initialisation) needs method finetune, mean_teacher or auto (a probe head reads
        # a pretrained encoder), and excludes an encoder_id.
        json_schema_extra={
            "allOf": [
                {
                    "not": {
                        "required": ["objective"],
                        "properties": {
                            "objective": {"const": "none"},
                            "method": {"const": "linear"},
                        },
                    }
                },
                {
                    "not": {
                        "required": ["objective", "encoder_id"],
                        "properties": {
                            "objective": {"const": "none"},
                            "encoder_id": {"type": "string"},
                        },
                    }
                },
            ]
        },
    )

    image_ids: list[Id] | None = Field(
        default=None, min_length=1, description="images to segment (default: every image)"
    )
    label_ids: list[Id] | None = Field(
        default=None,
        min_length=1,
        description="label versions to learn from (default: every image's final labels)",
    )
    encoder_id: Id | None = Field(
        default=None, description="encoder to use (default: reuse or pretrain, see above)"
    )
    objective: Objective | Literal["none"] | None = Field(
        default=None,
        description="reuse or pretrain only an encoder of this objective; 'none' = random "
        "initialisation (method finetune, mean_teacher or auto, which then fits scratch only)",
    )
    method: Method = Field(
        default="linear",
        description="linear: a probe head on cached encoder features (seconds); finetune, "
        "mean_teacher: train the whole network (minutes); auto: fit the probe heads, and "
        "fine-tuning and scratch when config.auto_budget_seconds allows, keep the best Dice on "
        "held-out labelled pixels (the middle labelled slice; tiles of it when only one is "
        "labelled; result.method names the winner, "
        "result.validation every candidate's score or why it was skipped)",
    )
    head: Literal["linear", "mlp", "auto"] = Field(
        default=DEFAULT_HEAD,
        description="probe head; auto: the better of linear and mlp on held-out tiles of the "
        "labelled slices (result.validation)",
    )
    axis: int | None = Field(default=None, ge=0, le=2, description="default: from the labels")
    probabilities: bool = Field(
        default=False, description="also store class probabilities and the uncertainty map"
    )
    config: FewShotConfig | None = Field(
        default=None, description="expert overrides of the few-shot fit (only the keys given)"
    )


class ErrorPublic(BaseModel):
    """Every 4xx answer: ``{"detail": "<message naming the problem>"}`` (:mod:`segassist.server.errors`)."""

    detail: str


class AuditEventPublic(_Public):
    """One recorded write: who, what (route template, path, path ids), when, from where."""

    id: int
    at: datetime
    user_id: str | None
    user_name: str | None
    role: str | None
    method: str
    route: str | None
    path: str
    status_code: int
    client: str | None
    object_ids: dict[str, str]
