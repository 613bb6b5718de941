"""The life cycle of a job, shared by every task: claim, run a pipeline, record the outcome.

The SQL job row is the status of record. :func:`run_job` is safe to call again for the same job
(a redelivered message, a re-enqueued orphan): a finished job is left alone, a job another live
worker is running is left to it, and a job whose worker died is taken over (its pipeline resumes
from what the previous attempt left in ``jobs/<id>/work/``). Starting a job increments its
``attempts``; every later write of the delivery (progress, registered models, the outcome) is
conditional on that attempt (:mod:`segassist.worker.attempts`), so a worker presumed dead cannot overwrite
the one that took over.

While the pipeline runs, everything logged in the process goes to ``jobs/<id>/log.txt`` as well
(served by ``GET /jobs/{id}/logs``), and :class:`ProgressWriter` stores progress on the row at most
about once per second, checking ``cancel_requested`` each time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from segassist.models.progress import Progress
from segassist.server.db import Job, JobStatus, session_factory
from segassist.server.db.tables import utcnow
from segassist.server.settings import Settings
from segassist.server.storage import Storage
from segassist.worker.attempts import (
    AttemptSuperseded,
    Heartbeat,
    guard_attempt,
    owner_gone,
    worker_identity,
)

__all__ = [
    "MAX_ATTEMPTS",
    "JobCancelled",
    "JobContext",
    "Pipeline",
    "ProgressWriter",
    "run_job",
]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A job whose worker died this many times (killed, out of memory, hard time limit) fails."""

PROGRESS_INTERVAL_SECONDS = 1.0
"""Least time between two progress writes to the job row (the last step is always written)."""

FINAL_WRITE_RETRY_SECONDS = 120.0
"""How long the outcome of a job is retried while the database is unreachable (a restart)."""

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JobCancelled(Exception):
    """Raised inside a pipeline when the job's cancellation was requested."""


ProgressPublisher = Callable[[dict[str, Any]], None]
"""Optional extra sink for progress (e.g. Celery's ``update_state``)."""


class ProgressWriter:
    """A :data:`segassist.models.progress.ProgressCallback` writing to the job row, throttled.

    A report is written when a second has passed since the last write, at the last step, and at
    a change of phase; a non-finite loss is stored as ``null`` (JSON has no NaN).

    Each write is conditional on ``attempt`` (it refreshes the heartbeat too) and reads
    ``cancel_requested``: it raises :class:`JobCancelled` when that is set, so a training loop
    stops (after checkpointing) within about a second of a cancel, and
    :class:`~segassist.worker.attempts.AttemptSuperseded` when another worker took the job over (at once
    when ``heartbeat`` already noticed). A database that is briefly unreachable skips a write.
    """

    def __init__(
        self,
        job_id: str,
        attempt: int,
        sessions: sessionmaker[Session],
        heartbeat: Heartbeat | None = None,
        publish: ProgressPublisher | None = None,
        interval: float = PROGRESS_INTERVAL_SECONDS,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.sessions = sessions
        self.heartbeat = heartbeat
        self.publish = publish
        self.interval = interval
        self._last_write = float("-inf")
        self._last_phase: str | None = None

    def __call__(self, progress: Progress) -> None:
        if self.heartbeat is not None and self.heartbeat.lost:
            raise AttemptSuperseded(f"job {self.job_id} was taken over by another worker")
        now = time.monotonic()
        routine = progress.step < progress.total and progress.phase == self._last_phase
        if routine and now - self._last_write < self.interval:
            return
        self._last_write, self._last_phase = now, progress.phase
        state = {
            "step": progress.step,
            "total": progress.total,
            "loss": progress.loss if math.isfinite(progress.loss) else None,
            "eta_seconds": progress.eta_seconds,
            "phase": progress.phase,
        }
        try:
            with self.sessions.begin() as session:
                if session.get(Job, self.job_id) is None:
                    raise JobCancelled("the job row was deleted")
                guard_attempt(session, self.job_id, self.attempt)
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id)
                    .values(progress=state)
                    .execution_options(synchronize_session=False)
                )
                cancel = bool(
                    session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
                )
        except OperationalError:
            logger.warning("job %s: progress not written (database unreachable)", self.job_id)
            return
        if self.publish is not None:
            try:
                self.publish(state)
            except Exception:  # an optional sink (the result backend); the row has the state
                logger.warning("job %s: progress not published", self.job_id, exc_info=True)
        if cancel:
            raise JobCancelled("cancellation requested")


@dataclass
class JobContext:
    """What a pipeline gets: the job's identity and parameters, the datastore, progress."""

    job_id: str
    kind: str
    dataset_id: str
    params: dict[str, Any]
    attempt: int
    settings: Settings
    storage: Storage
    sessions: sessionmaker[Session]
    progress: ProgressWriter

    @property
    def workdir(self) -> Path:
        """Scratch folder kept across attempts (checkpoints); created on access."""
        path = self.storage.job_workdir(self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def owned_session(self) -> Iterator[Session]:
        """A transaction that commits only while this attempt still owns the job.

        Use it for every write that publishes something (a registered model, a follow-up job):
        a superseded attempt gets :class:`~segassist.worker.attempts.AttemptSuperseded` and writes nothing.
        """
        with self.sessions.begin() as session:
            guard_attempt(session, self.job_id, self.attempt)
            yield session

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if a cancel was requested (one row read)."""
        with self.sessions() as session:
            job = session.get(Job, self.job_id)
            if job is None or job.cancel_requested:
                raise JobCancelled("cancellation requested")


Pipeline = Callable[[JobContext], dict[str, Any]]
"""Does the work of one job kind and returns the job's ``result``."""


def run_job(
    job_id: str,
    pipeline: Pipeline,
    settings: Settings,
    publish: ProgressPublisher | None = None,
) -> str:
    """Run one delivery of job ``job_id``; returns the job's status afterwards.

    Raises only if the database stays unreachable (the message is then acknowledged as failed
    and the job, left ``running`` with an ageing heartbeat, is re-enqueued by
    :mod:`segassist.worker.recovery`).
    """
    sessions = session_factory(settings)
    storage = Storage(settings.data_dir)
    log_path = storage.job_log(job_id)
    with _job_log(log_path):
        claimed = _claim(job_id, sessions)
        if claimed is None:
            return _status(job_id, sessions)
        if not _mark_running(job_id, claimed, sessions):
            logger.info("job %s was claimed by another worker meanwhile", job_id)
            return _status(job_id, sessions)
        attempt = claimed.attempts + 1
        with Heartbeat(job_id, attempt, sessions) as heartbeat:
            ctx = JobContext(
                job_id=job_id,
                kind=str(claimed.kind),
                dataset_id=claimed.dataset_id,
                params=dict(claimed.params or {}),
                attempt=attempt,
                settings=settings,
                storage=storage,
                sessions=sessions,
                progress=ProgressWriter(job_id, attempt, sessions, heartbeat, publish),
            )
            return _execute(ctx, pipeline)


def _execute(ctx: JobContext, pipeline: Pipeline) -> str:
    logger.info("%s job %s: attempt %d started", ctx.kind, ctx.job_id, ctx.attempt)
    try:
        ctx.check_cancelled()
        result = pipeline(ctx)
    except Exception as exc:
        cause = _control_cause(exc)
        if isinstance(cause, AttemptSuperseded):
            logger.error("%s job %s: %s; this attempt stops here", ctx.kind, ctx.job_id, cause)
        elif isinstance(cause, JobCancelled):
            logger.info("%s job %s cancelled (%s)", ctx.kind, ctx.job_id, cause)
            _finish_attempt(ctx, JobStatus.cancelled)
        elif isinstance(cause, SoftTimeLimitExceeded):
            limit = ctx.settings.task_soft_time_limit
            message = (
                f"the job ran longer than the time limit of {limit} s "
                "(SEGASSIST_TASK_SOFT_TIME_LIMIT) and was stopped"
            )
            logger.error("%s job %s failed: %s", ctx.kind, ctx.job_id, message)
            _finish_attempt(ctx, JobStatus.failed, error=message)
        else:
            logger.exception("%s job %s failed", ctx.kind, ctx.job_id)
            _finish_attempt(ctx, JobStatus.failed, error=_describe(exc))
    else:
        logger.info("%s job %s succeeded: %s", ctx.kind, ctx.job_id, result)
        _finish_attempt(ctx, JobStatus.succeeded, result=result)
    return _status(ctx.job_id, ctx.sessions)


_CONTROL = (AttemptSuperseded, JobCancelled, SoftTimeLimitExceeded)


def _control_cause(exc: BaseException) -> BaseException | None:
    """The cancel, take-over or time-limit exception behind ``exc``, if any.

    Libraries wrap what is raised inside them (MONAI re-raises an error inside a transform as
    ``RuntimeError("applying transform …")``), and the soft time limit is raised asynchronously
    wherever the job happens to be, so the chain of causes is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _CONTROL):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException) -> str:
    """A readable one-line error: the message, or the exception's type when it has none."""
    text = str(exc).strip()
    if isinstance(exc, (ValueError, FileNotFoundError, LookupError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class _Claim:
    kind: str
    dataset_id: str
    params: dict[str, Any]
    status: JobStatus
    attempts: int


def _claim(job_id: str, sessions: sessionmaker[Session]) -> _Claim | None:
    """Decide whether this delivery runs the job; records the outcomes that need no pipeline."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            logger.warning("job %s does not exist (deleted?); message dropped", job_id)
            return None
        claim = _Claim(
            kind=str(job.kind),
            dataset_id=job.dataset_id,
            params=dict(job.params or {}),
            status=JobStatus(job.status),
            attempts=job.attempts,
        )
        cancel_requested, gone = job.cancel_requested, owner_gone(job)
    if claim.status.finished:
        logger.info("job %s already %s; duplicate delivery ignored", job_id, claim.status)
        return None
    if claim.status is JobStatus.running:
        if not gone:
            logger.info("job %s is running on a live worker; duplicate delivery ignored", job_id)
            return None
        logger.warning(
            "job %s lost its worker during attempt %d; taking it over", job_id, claim.attempts
        )
    if cancel_requested:
        logger.info("job %s cancelled before it (re)started", job_id)
        _finish(job_id, sessions, JobStatus.cancelled, expect=claim)
        return None
    if claim.attempts >= MAX_ATTEMPTS:
        error = (
            f"gave up after {claim.attempts} attempts: the worker running this job died each "
            "time (killed, out of memory, or over the hard time limit)"
        )
        logger.error("job %s: %s", job_id, error)
        _finish(job_id, sessions, JobStatus.failed, error=error, expect=claim)
        return None
    return claim


def _mark_running(job_id: str, claim: _Claim, sessions: sessionmaker[Session]) -> bool:
    """Compare-and-set the row to ``running`` (attempts + 1); False if another worker won."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == claim.status, Job.attempts == claim.attempts)
            .values(
                status=JobStatus.running,
                attempts=claim.attempts + 1,
                error=None,
                updated_at=now,
                heartbeat_at=now,
                worker_id=worker_identity(),
            )
            .execution_options(synchronize_session=False)
        )
        claimed = bool(result.rowcount)  # type: ignore[attr-defined]
        if claimed:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.started_at.is_(None))
                .values(started_at=now)
                .execution_options(synchronize_session=False)
            )
    return claimed


def _finish(
    job_id: str,
    sessions: sessionmaker[Session],
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    expect: _Claim | None = None,
) -> None:
    """Record a terminal state (only if the row is still as ``expect`` saw it, when given)."""
    statement = update(Job).where(Job.id == job_id)
    if expect is not None:
        statement = statement.where(Job.status == expect.status, Job.attempts == expect.attempts)
    with sessions.begin() as session:
        session.execute(
            statement.values(
                status=status, result=result, error=error, finished_at=utcnow(), updated_at=utcnow()
            ).execution_options(synchronize_session=False)
        )


def _finish_attempt(
    ctx: JobContext,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record the outcome of ``ctx``'s attempt, only if the row is still that attempt's.

    A superseded attempt's outcome is refused (and logged by :func:`guard_attempt`). While the
    database is unreachable (a restart) the write is retried for
    :data:`FINAL_WRITE_RETRY_SECONDS`, so a finished job does not run again for nothing.
    """
    deadline = time.monotonic() + FINAL_WRITE_RETRY_SECONDS
    delay = 0.5
    while True:
        try:
            with ctx.owned_session() as session:
                now = utcnow()
                session.execute(
                    update(Job)
                    .where(Job.id == ctx.job_id)
                    .values(
                        status=status, result=result, error=error, finished_at=now, updated_at=now
                    )
                    .execution_options(synchronize_session=False)
                )
            return
        except AttemptSuperseded:
            return
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            logger.warning(
                "job %s: database unreachable; outcome retried in %.1f s", ctx.job_id, delay
            )
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def _status(job_id: str, sessions: sessionmaker[Session]) -> str:
    with sessions() as session:
        job = session.get(Job, job_id)
        return "missing" if job is None else str(job.status)


@contextmanager
def _job_log(path: Path) -> Iterator[None]:
    """Copy every record logged in this process (INFO and above) to the job's log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
