"""Re-enqueue jobs whose message the broker no longer holds (a worker died with it).

Late acknowledgement makes a message survive its worker on Redis: the unacknowledged message
goes back to the queue after the visibility timeout. The embedded filesystem transport is
different: a consumer deletes the message file as it reads it and keeps the unacknowledged
message in memory, so ``kill -9`` (or a power cut) loses it. The job row would then stay
``queued`` or ``running`` forever.

Every worker therefore runs a :class:`RecoverySweeper` in its main process: at start-up and then
every :data:`SWEEP_SECONDS` it looks for

- ``running`` jobs whose lease (:mod:`worker.lease`) is stale — their worker is gone. The row is
  set back to ``queued`` (compare-and-set, so of several sweeping workers exactly one wins), a
  line is added to the job's log, and the job is re-enqueued unless the filesystem broker still
  holds a message for it (a cold shutdown puts unacknowledged messages back);
- on the filesystem broker only, ``queued`` jobs older than :data:`QUEUED_GRACE_SECONDS` with no
  message file (lost between read and start) — re-enqueued.

Duplicates are harmless: the task id is the job id and :func:`worker.jobs.run_job` ignores a
delivery for a finished job or for one a live worker is running. The next delivery resumes the
job: pretraining continues from ``jobs/<id>/work/checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.db import Job, JobStatus, session_factory
from server.db.tables import utcnow
from server.queue import PREDICTION_QUEUE, QUEUE_NAME, broker_folders, enqueue_job
from server.settings import Settings
from server.storage import Storage
from worker.lease import lease_path, owner_gone

__all__ = [
    "QUEUED_GRACE_SECONDS",
    "SWEEP_SECONDS",
    "RecoverySweeper",
    "recover_orphaned_jobs",
]

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 30.0
"""Time between two sweeps of a worker."""

QUEUED_GRACE_SECONDS = 60.0
"""A queued job younger than this may still be on its way to the broker; left alone."""


def recover_orphaned_jobs(celery: Celery, settings: Settings) -> list[str]:
    """One sweep: re-enqueue the jobs that lost their message; returns their ids."""
    sessions = session_factory(settings)
    storage = Storage(settings.data_dir)
    embedded = settings.broker_url.startswith("filesystem://")
    pending = _messages_in_folder(settings) if embedded else set()
    now = datetime.now(UTC)
    recovered: list[str] = []
    with sessions() as session:
        candidates = session.scalars(
            select(Job).where(Job.status.in_([JobStatus.queued, JobStatus.running]))
        ).all()
    for job in candidates:
        if job.status == JobStatus.running:
            if not owner_gone(lease_path(storage, job.id), job.updated_at):
                continue
            if not _requeue_row(job, sessions):
                continue
            _note(storage.job_log(job.id), f"the worker running attempt {job.attempts} was lost")
        elif not (embedded and _age(job.updated_at, now) > QUEUED_GRACE_SECONDS):
            continue
        if job.id in pending:
            continue
        enqueue_job(celery, job)
        logger.warning("re-enqueued %s job %s (its message was lost)", job.kind, job.id)
        recovered.append(job.id)
    return recovered


def _age(moment: datetime, now: datetime) -> float:
    # SQLite hands timezone-aware columns back naive (stored in UTC).
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return (now - aware).total_seconds()


def _requeue_row(job: Job, sessions: sessionmaker[Session]) -> bool:
    """Set a lost ``running`` job back to ``queued`` unless someone changed it meanwhile."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.status == JobStatus.running,
                Job.attempts == job.attempts,
            )
            .values(status=JobStatus.queued, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _note(log_path: Path, message: str) -> None:
    """Append one line to a job's log (the sweeper is not inside the job's logging context)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().isoformat(sep=" ", timespec="milliseconds")
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"{stamp} WARNING {__name__}: {message}; re-queued\n")


def _messages_in_folder(settings: Settings) -> set[str]:
    """Task ids (= job ids) of the messages waiting in the filesystem broker's folder."""
    folder = Path(broker_folders(settings)["data_folder_in"])
    ids: set[str] = set()
    paths = [p for q in (QUEUE_NAME, PREDICTION_QUEUE) for p in folder.glob(f"*.{q}.msg")]
    for path in paths:
        try:
            payload = json.loads(path.read_bytes())
            ids.add(str(payload["headers"]["id"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ids


class RecoverySweeper:
    """Runs :func:`recover_orphaned_jobs` now and every ``interval`` seconds in a daemon thread."""

    def __init__(self, celery: Celery, settings: Settings, interval: float = SWEEP_SECONDS) -> None:
        self.celery = celery
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-recovery", daemon=True)

    def start(self) -> None:
        """Start sweeping."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current sweep."""
        self._stop.set()
        self._thread.join(timeout=self.interval)

    def _run(self) -> None:
        while True:
            try:
                recover_orphaned_jobs(self.celery, self.settings)
            except Exception:
                logger.exception("job recovery sweep failed; retrying in %.0f s", self.interval)
            if self._stop.wait(self.interval):
                return
