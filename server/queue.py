"""Celery configuration and the API's client-only Celery app.

The API enqueues by task name (``segassist.<kind>``) with the job id as the only argument and
never imports ``worker/``; the worker builds its app from the same :func:`celery_config`.

Brokers: ``filesystem://`` (embedded default; message folder under ``<data_dir>/broker``) or
``redis://…``. The SQL job row is the status of record; a result backend is configured only so
tasks may report ``update_state(state="PROGRESS", …)`` (a file store under ``<data_dir>/broker``
or the same Redis).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Celery

from segassist.models.runtime.configs import FewShotConfig
from segassist.server.broker import TRANSPORT as BROKER_TRANSPORT

if TYPE_CHECKING:
    from segassist.server.db.tables import Job
    from segassist.server.settings import Settings

__all__ = [
    "PREDICTION_QUEUE",
    "QUEUE_NAME",
    "REFINEMENT_QUEUE",
    "broker_folders",
    "celery_config",
    "check_broker",
    "enqueue_job",
    "make_celery",
    "queue_for",
    "task_name",
]

logger = logging.getLogger(__name__)

QUEUE_NAME = "segassist"
"""The training queue: pretraining, fine-tuning (long, one at a time)."""
PREDICTION_QUEUE = "segassist-prediction"
"""The interactive queue: predictions and assist runs that fit only a head (seconds each), so a
user never waits behind a pretraining; its concurrency is ``prediction_concurrency``."""
REFINEMENT_QUEUE = "segassist-refinement"
"""The background refinements of assist results (a small network trained for tens of seconds,
:mod:`segassist.worker.refine`): behind a 1000-step background pretraining on the training
queue, the annotator waited minutes for one; on a queue of its own it starts at once."""
_ENCODER_METHODS = ("finetune", "mean_teacher")
_DEFAULT_AUTO_BUDGET = float(FewShotConfig.model_fields["auto_budget_seconds"].default)
_VISIBILITY_MARGIN_SECONDS = 3600


def task_name(kind: str) -> str:
    """Registered Celery name of the task running jobs of ``kind``."""
    return f"segassist.{kind}"


def queue_for(kind: str, params: dict[str, Any] | None = None) -> str:
    """The queue of a job: :data:`PREDICTION_QUEUE` for ``predict``, ``features`` and for
    ``assist`` with a probe method or ``"auto"`` within its default budget (cost: the head; and, once per modality, the short
    pretraining when no encoder exists yet, which holds the queue for about two minutes rather
    than wait behind a long background pretraining); :data:`REFINEMENT_QUEUE` for ``refine``;
    :data:`QUEUE_NAME` for everything that trains an encoder for long."""
    if kind in ("predict", "features"):
        return PREDICTION_QUEUE
    if kind == "refine":
        return REFINEMENT_QUEUE
    if kind == "assist" and _interactive_assist(params or {}):
        return PREDICTION_QUEUE
    return QUEUE_NAME


def _interactive_assist(params: dict[str, Any]) -> bool:
    """Whether an assist job fits only a head: a probe method, or ``"auto"`` within the default
    budget (its network candidates are then skipped) on a pretrained encoder (objective
    ``"none"`` leaves auto only the scratch network, which no budget skips)."""
    method = params.get("method", "linear")
    if method != "auto":
        return method not in _ENCODER_METHODS
    budget = (params.get("config") or {}).get("auto_budget_seconds", _DEFAULT_AUTO_BUDGET)
    return params.get("objective") != "none" and float(budget) <= _DEFAULT_AUTO_BUDGET


def broker_folders(settings: Settings) -> dict[str, str]:
    """Folders of the filesystem transport (created if missing).

    Producer and consumer share one message folder: the API writes to ``data_folder_out``, the
    worker reads ``data_folder_in``. They also share the control folder (the exchange → queue
    bindings, read by every publish and by broadcasts such as ``celery inspect``): kombu's
    default is ``./control``, relative to each process's working directory. A message is written
    under ``staging`` first and renamed into ``messages`` (:mod:`segassist.server.broker`).
    """
    messages = settings.broker_dir / "messages"
    processed = settings.broker_dir / "processed"
    control = settings.broker_dir / "control"
    staging = settings.broker_dir / "staging"
    for folder in (messages, processed, control, staging):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(messages),
        "data_folder_out": str(messages),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "staging_folder": str(staging),
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API (client) and the worker.

    Late acknowledgement, prefetch 1 and reject-on-worker-lost make a task that dies with its
    worker run again (tasks are idempotent on the job id); on Redis the visibility timeout exceeds
    the hard time limit so a long task is not redelivered while it still runs.
    """
    config: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_hard_time_limit,
        "task_default_queue": QUEUE_NAME,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if settings.broker_url.startswith("filesystem://"):
        results = settings.broker_dir / "results"
        results.mkdir(parents=True, exist_ok=True)
        config |= {
            "broker_url": "filesystem://",
            # Kombu's own filesystem channel can lose a message a worker reads while it is
            # being written; this one publishes by rename.
            "broker_transport": BROKER_TRANSPORT,
            # Kombu polls the folder once a second by default: the wait a user sees between
            # submitting labels and the worker starting. 0.1 s costs a listdir per poll.
            "broker_transport_options": {**broker_folders(settings), "polling_interval": 0.1},
            "result_backend": f"file://{results}",
        }
    else:
        visibility = settings.task_hard_time_limit + _VISIBILITY_MARGIN_SECONDS
        config |= {
            "broker_url": settings.broker_url,
            "broker_transport_options": {"visibility_timeout": visibility},
            "result_backend": settings.broker_url,
            "result_backend_transport_options": {"visibility_timeout": visibility},
        }
    return config


def make_celery(settings: Settings) -> Celery:
    """A client-only Celery app (no tasks registered) for enqueuing from the API."""
    app = Celery("segassist-api", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def enqueue_job(celery: Celery, job: Job) -> str:
    """Send the task of ``job`` by name with the job id only; returns the Celery task id.

    The task id is the job id, so a duplicate send is recognisable by the worker; the caller
    stores it in ``job.celery_task_id``.
    """
    queue = queue_for(job.kind, job.params)
    result = celery.send_task(task_name(job.kind), args=[job.id], task_id=job.id, queue=queue)
    logger.info("enqueued %s job %s on %s", job.kind, job.id, queue)
    return str(result.id)


def check_broker(celery: Celery) -> None:
    """Raise if the broker cannot be reached (one connection attempt, short timeout)."""
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
