"""Re-enqueue (or fail) jobs whose worker or message is gone, from the job rows alone.

A message can outlive its worker or vanish with it: late acknowledgement keeps it on Redis until
the visibility timeout, but the embedded filesystem transport holds an unacknowledged message in
the consumer's memory (``kill -9`` loses it), and a Redis restarted without persistence loses
every queued message. The job row, not the broker, is therefore what recovery reads. Every worker
runs a :class:`RecoverySweeper` in its main process: at start-up and then every
``settings.recovery_sweep_seconds`` (30 s) it looks at the ``queued`` and ``running`` rows and

- a ``running`` job whose owner is gone (:func:`segassist.worker.attempts.owner_gone`: heartbeat older than
  :data:`~segassist.worker.attempts.HEARTBEAT_TIMEOUT_SECONDS`, or its process on this host dead) is set
  back to ``queued`` by compare-and-set on its attempt (of several sweeping workers exactly one
  wins), noted in the job's log and re-enqueued; after :data:`~segassist.worker.jobs.MAX_ATTEMPTS` lost
  workers it is failed with the reason instead;
- a ``queued`` job untouched for ``settings.queued_resend_seconds`` (300 s) is re-enqueued and
  its ``updated_at`` moved on (compare-and-set), so it is sent again at most once per period
  while it waits.

Duplicates are harmless: the task id is the job id and :func:`segassist.worker.jobs.run_job` ignores a
delivery for a finished job or one a live worker is running. The next delivery resumes the job:
pretraining continues from ``jobs/<id>/work/checkpoint.pt``.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from segassist.server.db import Job, JobStatus, session_factory
from segassist.server.db.tables import utcnow
from segassist.server.queue import enqueue_job
from segassist.server.settings import Settings
from segassist.server.storage import Storage
from segassist.worker.attempts import owner_gone
from segassist.worker.jobs import MAX_ATTEMPTS

__all__ = ["RecoverySweeper", "recover_orphaned_jobs"]

logger = logging.getLogger(__name__)


def recover_orphaned_jobs(celery: Celery, settings: Settings) -> list[str]:
    """One sweep over the job rows; returns the ids of the jobs re-enqueued."""
    sessions = session_factory(settings)
    storage = Storage(settings.data_dir)
    now = datetime.now(UTC)
    with sessions() as session:
        candidates = session.scalars(
            select(Job).where(Job.status.in_([JobStatus.queued, JobStatus.running]))
        ).all()
    recovered: list[str] = []
    for job in candidates:
        if job.status == JobStatus.running:
            if not owner_gone(job, now):
                continue
            lost = f"the worker running attempt {job.attempts} was lost"
            if job.attempts >= MAX_ATTEMPTS:
                error = (
                    f"gave up after {job.attempts} attempts: the worker running this job died "
                    "each time (killed, out of memory, or over the hard time limit)"
                )
                if _set_from_running(job, sessions, JobStatus.failed, error=error):
                    _note(storage.job_log(job.id), f"{lost}; {error}")
                continue
            if not _set_from_running(job, sessions, JobStatus.queued):
                continue
            _note(storage.job_log(job.id), f"{lost}; re-queued")
        elif not _resend_due(job, sessions, now, settings.queued_resend_seconds):
            continue
        enqueue_job(celery, job)
        logger.warning("re-enqueued %s job %s (%s)", job.kind, job.id, job.status)
        recovered.append(job.id)
    return recovered


def _set_from_running(
    job: Job, sessions: sessionmaker[Session], status: JobStatus, error: str | None = None
) -> bool:
    """Move a lost ``running`` attempt to ``status`` unless the row changed meanwhile."""
    now = utcnow()
    finished = {"finished_at": now, "error": error} if status.finished else {}
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.status == JobStatus.running,
                Job.attempts == job.attempts,
            )
            .values(status=status, updated_at=now, heartbeat_at=None, **finished)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _resend_due(
    job: Job, sessions: sessionmaker[Session], now: datetime, after_seconds: float
) -> bool:
    """Whether a ``queued`` job waited ``after_seconds`` untouched; claims the resend."""
    updated = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=UTC)
    if now - updated <= timedelta(seconds=after_seconds):
        return False
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.status == JobStatus.queued,
                Job.updated_at == job.updated_at,
            )
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _note(log_path: Path, message: str) -> None:
    """Append one line to a job's log (the sweeper is not inside the job's logging context)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().isoformat(sep=" ", timespec="milliseconds")
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"{stamp} WARNING {__name__}: {message}\n")


class RecoverySweeper:
    """Runs :func:`recover_orphaned_jobs` now and every ``settings.recovery_sweep_seconds`` in a
    daemon thread."""

    def __init__(self, celery: Celery, settings: Settings) -> None:
        self.celery = celery
        self.settings = settings
        self.interval = settings.recovery_sweep_seconds
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
