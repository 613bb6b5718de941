"""Attempts and heartbeats on the job row: which worker owns a running job, and whether it lives.

A worker that starts a job increments ``jobs.attempts`` by compare-and-set; from then on it is
*attempt n* and every write it makes to the database is conditional on the row still saying
``status = running AND attempts = n`` (:func:`guard_attempt`). A worker wrongly presumed dead
(a long stall, a network partition) therefore cannot overwrite the worker that took over: its
write matches no row, is refused, and logged.

While it runs, :class:`Heartbeat` refreshes ``heartbeat_at`` every :data:`HEARTBEAT_SECONDS`
(progress writes refresh it too). A running job has lost its worker (:func:`owner_gone`) when
the heartbeat is older than :data:`HEARTBEAT_TIMEOUT_SECONDS`, or at once when ``worker_id``
names a process of this host that no longer exists (``kill -9``). Everything is read from the
row: recovery needs no broker internals and no shared files.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime
from types import TracebackType

from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from segassist.server.db import Job, JobStatus
from segassist.server.db.tables import utcnow

__all__ = [
    "HEARTBEAT_SECONDS",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "AttemptSuperseded",
    "Heartbeat",
    "guard_attempt",
    "owner_gone",
    "worker_identity",
]

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
"""How often a running attempt refreshes ``heartbeat_at``."""

HEARTBEAT_TIMEOUT_SECONDS = 60.0
"""A running job whose heartbeat is older than this has lost its worker."""


class AttemptSuperseded(Exception):
    """This attempt no longer owns the job (another worker took it over, or it was reset)."""


def worker_identity() -> str:
    """``"<host> <pid>"`` of the calling process, stored in ``jobs.worker_id``."""
    return f"{socket.gethostname()} {os.getpid()}"


def _aware(moment: datetime) -> datetime:
    # SQLite hands timezone-aware columns back naive (stored in UTC).
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _process_gone(worker_id: str | None) -> bool:
    """Whether ``worker_id`` names a process of this host that does not exist."""
    host, _, pid = (worker_id or "").rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def owner_gone(job: Job, now: datetime | None = None) -> bool:
    """Whether the running ``job`` lost its worker (row fields only).

    Stale when ``now - (heartbeat_at or updated_at) > HEARTBEAT_TIMEOUT_SECONDS``, or when its
    ``worker_id`` is a dead process of this host.
    """
    now = datetime.now(UTC) if now is None else now
    last = _aware(job.heartbeat_at or job.updated_at)
    if (now - last).total_seconds() > HEARTBEAT_TIMEOUT_SECONDS:
        return True
    return _process_gone(job.worker_id)


def guard_attempt(session: Session, job_id: str, attempt: int) -> None:
    """Refresh the heartbeat of ``attempt`` inside the caller's transaction, or refuse.

    The conditional ``UPDATE … WHERE attempts = attempt AND status = 'running'`` also locks the
    row until the caller commits (PostgreSQL), so a take-over waits for this write to land.

    Raises:
        AttemptSuperseded: the row is no longer this attempt's (the caller must roll back).
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.running)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        logger.error("job %s: write of stale attempt %d refused", job_id, attempt)
        raise AttemptSuperseded(f"job {job_id} is no longer run by attempt {attempt}")


class Heartbeat:
    """Refreshes the heartbeat of one attempt in a daemon thread while the job runs.

    A context manager. When the row shows another attempt (this one was presumed lost) it stops
    and sets :attr:`lost`, so the job's loop stops at its next progress report. A database that
    is briefly unreachable (restart) costs a missed beat, not the job.
    """

    def __init__(
        self,
        job_id: str,
        attempt: int,
        sessions: sessionmaker[Session],
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.sessions = sessions
        self.interval = interval
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.sessions.begin() as session:
                    guard_attempt(session, self.job_id, self.attempt)
            except AttemptSuperseded:
                self.lost = True
                return
            except OperationalError:
                logger.warning("job %s: heartbeat not written (database unreachable)", self.job_id)
