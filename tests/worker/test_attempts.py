"""Attempt-guarded writes and row-based recovery, on SQLite + filesystem broker and on
PostgreSQL + Redis (the worker conftest's ``settings``)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from segassist.server.db import Dataset, Job, JobKind, JobStatus, migrate, session_factory
from segassist.server.db.tables import utcnow
from segassist.server.queue import make_celery
from segassist.server.settings import Settings
from segassist.server.storage import Storage
from segassist.worker.attempts import HEARTBEAT_TIMEOUT_SECONDS, AttemptSuperseded, Heartbeat
from segassist.worker.jobs import MAX_ATTEMPTS, JobContext, run_job
from segassist.worker.recovery import recover_orphaned_jobs

ELSEWHERE = "another-host 4242"
"""``worker_id`` of a worker on another machine: only its heartbeat can tell it is alive."""


def _job(settings: Settings, **values: Any) -> str:
    """A pretrain job row of a fresh dataset with ``values`` set; returns its id."""
    migrate(settings.database_url)
    with session_factory(settings).begin() as session:
        dataset = Dataset(name="d", modality="CT", labels={})
        session.add(dataset)
        session.flush()
        job = Job(kind=JobKind.pretrain, dataset_id=dataset.id, params={}, **values)
        session.add(job)
        session.flush()
        return job.id


def _row(settings: Settings, job_id: str) -> Job:
    with session_factory(settings)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _take_over(settings: Settings, job_id: str) -> None:
    """What a second worker's claim does to the row: the next attempt starts."""
    with session_factory(settings).begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(attempts=Job.attempts + 1, worker_id=ELSEWHERE, heartbeat_at=utcnow())
        )


def test_a_superseded_attempt_cannot_write_its_outcome_or_register_anything(
    settings: Settings,
) -> None:
    job_id = _job(settings)
    seen: dict[str, Any] = {}

    def pipeline(ctx: JobContext) -> dict[str, Any]:
        seen["attempt"] = ctx.attempt
        _take_over(settings, ctx.job_id)  # presumed dead meanwhile: attempt 2 started
        with pytest.raises(AttemptSuperseded), ctx.owned_session() as session:
            session.add(Dataset(name="published by a stale attempt", modality="CT", labels={}))
        return {"encoder_id": "from-the-stale-attempt"}

    status = run_job(job_id, pipeline, settings)

    job = _row(settings, job_id)
    assert seen["attempt"] == 1
    assert status == "running" and job.status == JobStatus.running  # attempt 2's to finish
    assert job.attempts == 2 and job.worker_id == ELSEWHERE
    assert job.result is None and job.finished_at is None
    with session_factory(settings)() as session:
        names = {d.name for d in session.query(Dataset)}
    assert "published by a stale attempt" not in names
    assert "refused" in Storage(settings.data_dir).job_log(job_id).read_text()


def test_the_current_attempt_writes_its_outcome_and_heartbeat(settings: Settings) -> None:
    job_id = _job(settings)
    status = run_job(job_id, lambda ctx: {"attempt": ctx.attempt}, settings)
    job = _row(settings, job_id)
    assert status == "succeeded" and job.result == {"attempt": 1}
    assert job.heartbeat_at is not None and job.worker_id is not None


def test_heartbeat_notices_a_take_over(settings: Settings) -> None:
    job_id = _job(settings, status=JobStatus.running, attempts=1, heartbeat_at=utcnow())
    sessions = session_factory(settings)
    with Heartbeat(job_id, 1, sessions, interval=0.05) as heartbeat:
        _take_over(settings, job_id)
        for _ in range(600):  # a hang guard on a shared machine, not a timing claim
            if heartbeat.lost:
                break
            time.sleep(0.05)
    assert heartbeat.lost


def test_jobs_whose_heartbeat_stopped_are_requeued_or_failed_from_the_rows(
    settings: Settings,
) -> None:
    old = utcnow() - timedelta(seconds=2 * HEARTBEAT_TIMEOUT_SECONDS)
    silent = _job(
        settings, status=JobStatus.running, attempts=1, heartbeat_at=old, worker_id=ELSEWHERE
    )
    alive = _job(
        settings, status=JobStatus.running, attempts=1, heartbeat_at=utcnow(), worker_id=ELSEWHERE
    )
    exhausted = _job(
        settings,
        status=JobStatus.running,
        attempts=MAX_ATTEMPTS,
        heartbeat_at=old,
        worker_id=ELSEWHERE,
    )
    celery = make_celery(settings)

    recovered = recover_orphaned_jobs(celery, settings)

    assert recovered == [silent]
    assert _row(settings, silent).status == JobStatus.queued
    assert _row(settings, alive).status == JobStatus.running
    failed = _row(settings, exhausted)
    assert failed.status == JobStatus.failed and f"{MAX_ATTEMPTS} attempts" in str(failed.error)
    assert "was lost" in Storage(settings.data_dir).job_log(silent).read_text()
    # The re-queued job is sent once: the next sweep finds it queued and recently touched.
    assert recover_orphaned_jobs(celery, settings) == []
