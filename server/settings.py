"""Service settings, read from ``SEGASSIST_*`` environment variables (pydantic-settings).

Build them with :func:`get_settings` (cached), never at import time, so tests and the CLI can set
the environment first. Every URL default derives from ``data_dir``: a fresh machine runs the
embedded service (SQLite, Celery filesystem broker) with nothing else installed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_API_TOKEN", "Settings", "get_settings"]

DEFAULT_API_TOKEN = "changethis"
"""Placeholder token; refused when ``environment="production"``."""


def _octal(value: object) -> object:
    """Permission bits given as text are octal (``"0640"``, ``"0o640"``), as in ``chmod``."""
    return int(value, 8) if isinstance(value, str) else value


class Settings(BaseSettings):
    """Configuration of the API and the worker (same settings for both).

    Attributes:
        data_dir: root of the on-disk datastore (images, labels, models, jobs, broker, SQLite).
        database_url: SQLAlchemy URL; default ``sqlite:///<data_dir>/segassist.db``.
        broker_url: ``"filesystem://"`` (Celery filesystem transport under ``<data_dir>/broker``)
            or ``"redis://…"``.
        max_upload_bytes: largest accepted upload (bytes).
        device: ONNX Runtime / torch device for predictions and training.
        task_soft_time_limit: seconds after which a task gets ``SoftTimeLimitExceeded``.
        task_hard_time_limit: seconds after which the worker kills the task.
        environment: ``"production"`` refuses placeholder secrets.
        api_token: bearer token clients must send when set (empty = no authentication).
        prediction_concurrency: prediction-queue tasks (assist probe fits, predictions) one
            embedded service runs at once; each is a worker process holding one volume.
        feature_cache_bytes: size bound of the per-(encoder, image) decoder-map cache.
        assist_pretrain_steps: pretraining steps the assist workflow runs inline when no
            encoder exists yet (the user waits for them: ~2 s per 4-slice step on 2 CPU cores).
        background_pretrain_steps: total steps of the pretraining that then continues in the
            background from where the inline one stopped (0 = none); the assist workflow refits
            on the better encoder when it lands.
        training_niceness: niceness of the embedded service's training-queue worker
            (pretraining, fine-tuning; 0-19): it yields shared cores to the
            prediction queue's interactive jobs (``segassist.worker.serve``).
        refinement_niceness: niceness of its refinement-queue worker (0-19): between the two,
            so a refinement runs beside a background pretraining, not behind it, and still
            yields to the annotator's next request.
        cors_origins: comma-separated origins allowed to call the API from a browser (CORS),
            e.g. an OHIF viewer's ``https://viewer.example.org``; empty = none.
        monailabel_modality: modality of the default dataset the MONAI Label routes at the
            server's root create on first upload (a DICOM upload's own Modality wins).
        monailabel_dataset: id of an existing dataset to serve at the root instead of the
            default one (empty = the default dataset).
        monailabel_username: user name ``POST /auth/token`` accepts (MONAI Label login).
        file_mode: permissions of every stored file (octal, ``SEGASSIST_FILE_MODE=0640``):
            group-readable by default, so an API and workers running as different users of one
            group share the datastore.
        dir_mode: permissions of staged folders (model artifacts, feature caches), e.g. ``0750``.
        recovery_sweep_seconds: time between two sweeps of a worker's job recovery
            (``worker/recovery.py``).
        queued_resend_seconds: a queued job untouched this long is sent to the broker again
            (its message may have been lost with a worker or a broker restart).
        monailabel_password: that user's password; ``/auth/token`` answers it with
            ``api_token`` (empty = no login: clients send the token themselves).
        audit_retention_days: audit events older than this many days are deleted, at the API's
            start and then daily (``None``, the default, keeps every event: how long a unit
            must keep its access records is its own policy; ``segassist audit --prune``
            deletes on demand).
    """

    model_config = SettingsConfigDict(env_prefix="SEGASSIST_", extra="ignore")

    data_dir: Path = Path("./segassist-data")
    database_url: str = ""
    broker_url: str = "filesystem://"
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task_soft_time_limit: int = Field(default=6 * 3600, gt=0)
    task_hard_time_limit: int = Field(default=6 * 3600 + 300, gt=0)
    environment: Literal["development", "production"] = "development"
    api_token: str = ""
    prediction_concurrency: int = Field(default=1, ge=1)
    feature_cache_bytes: int = Field(default=20 * 1024**3, gt=0)
    assist_pretrain_steps: int = Field(default=60, ge=1)
    background_pretrain_steps: int = Field(default=1000, ge=0)
    training_niceness: int = Field(default=19, ge=0, le=19)
    refinement_niceness: int = Field(default=10, ge=0, le=19)
    cors_origins: str = ""
    monailabel_modality: str = Field(default="CT", min_length=1, max_length=32)
    monailabel_dataset: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")
    monailabel_username: str = ""
    monailabel_password: str = ""
    file_mode: Annotated[int, BeforeValidator(_octal)] = Field(default=0o640, ge=0, le=0o777)
    dir_mode: Annotated[int, BeforeValidator(_octal)] = Field(default=0o750, ge=0, le=0o7777)
    recovery_sweep_seconds: float = Field(default=30.0, gt=0)
    queued_resend_seconds: float = Field(default=300.0, gt=0)
    audit_retention_days: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        """Fill URL defaults from ``data_dir`` and fail fast on unsafe production settings."""
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'segassist.db'}"
        if self.task_hard_time_limit <= self.task_soft_time_limit:
            raise ValueError(
                f"task_hard_time_limit ({self.task_hard_time_limit}) must exceed "
                f"task_soft_time_limit ({self.task_soft_time_limit})"
            )
        if self.environment == "production" and self.api_token == DEFAULT_API_TOKEN:
            raise ValueError(
                "SEGASSIST_API_TOKEN is still the placeholder 'changethis'; set a secret "
                "or leave it empty to disable authentication"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` as a list (blank entries dropped)."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def feature_dir(self) -> Path:
        """Folder of the decoder-map cache (:class:`segassist.models.features.FeatureCache`)."""
        return self.data_dir / "features"

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded Celery filesystem transport."""
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, built once per process."""
    return Settings()
