"""Cancelling jobs: the one rule the API's cancel route and the worker share."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from segassist.server.db.tables import Job, JobStatus, utcnow

__all__ = ["cancel_jobs"]


def cancel_jobs(session: Session, *where: Any) -> None:
    """Cancel the jobs matching ``where``: a queued one at once (``cancelled``), a running one
    by ``cancel_requested`` (it stops at its next progress report); finished ones are left as
    they are. Conditional updates, since a worker may move a job from queued to running
    meanwhile. The caller commits."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(*where, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=now, updated_at=now)
    )
    session.execute(
        update(Job)
        .where(*where, Job.status == JobStatus.running)
        .values(cancel_requested=True, updated_at=now)
    )
