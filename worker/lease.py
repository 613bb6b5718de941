"""Job leases: which live worker process owns a running job.

A worker that starts a job writes ``jobs/<id>/lease.json`` (host, pid, heartbeat time) and a
background thread refreshes the heartbeat every :data:`HEARTBEAT_SECONDS`. A lease is *stale* when
its heartbeat is older than :data:`LEASE_TIMEOUT_SECONDS`, or, on the same host, when its process
no longer exists (a worker killed with ``kill -9`` is recognised at once). A ``running`` job whose
lease is stale has lost its worker: the next delivery of its message takes it over, and
:mod:`worker.recovery` re-enqueues it when the broker lost the message.

The lease lives next to the job's log on the shared data directory (the deployed layout shares
storage between workers), so it needs no schema change and is readable by every worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from server.storage import Storage, atomic_write_bytes

__all__ = [
    "HEARTBEAT_SECONDS",
    "LEASE_TIMEOUT_SECONDS",
    "Lease",
    "LeaseKeeper",
    "lease_path",
    "owner_gone",
    "read_lease",
]

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
"""How often the owner refreshes its lease."""

LEASE_TIMEOUT_SECONDS = 60.0
"""A lease not refreshed for this long belongs to a lost worker."""


@dataclass(frozen=True)
class Lease:
    """Owner of a running job and the last time it proved alive (seconds since the epoch)."""

    host: str
    pid: int
    heartbeat: float

    @classmethod
    def mine(cls) -> Lease:
        """A lease for the calling process, fresh now."""
        return cls(host=socket.gethostname(), pid=os.getpid(), heartbeat=time.time())

    def is_mine(self) -> bool:
        """Whether the calling process holds this lease."""
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def is_stale(self, now: float | None = None) -> bool:
        """Whether the owner is gone: heartbeat too old, or its process died on this host."""
        now = time.time() if now is None else now
        if now - self.heartbeat > LEASE_TIMEOUT_SECONDS:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_path(storage: Storage, job_id: str) -> Path:
    """Where the lease of job ``job_id`` is kept."""
    return storage.job_dir(job_id) / "lease.json"


def read_lease(path: Path) -> Lease | None:
    """The lease stored at ``path``, or ``None`` when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
        return Lease(
            host=str(data["host"]), pid=int(data["pid"]), heartbeat=float(data["heartbeat"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner_gone(path: Path, updated_at: datetime) -> bool:
    """Whether a ``running`` job (lease at ``path``, row last updated ``updated_at``) lost its worker.

    Without a lease file, the owner counts as gone once the row has been quiet for
    :data:`LEASE_TIMEOUT_SECONDS` (a worker writes its lease just after marking the row).
    """
    lease = read_lease(path)
    if lease is not None:
        return lease.is_stale()
    if updated_at.tzinfo is None:  # SQLite hands timezone-aware columns back naive (UTC)
        updated_at = updated_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - updated_at).total_seconds() > LEASE_TIMEOUT_SECONDS


class LeaseKeeper:
    """Holds the lease of one job while it runs (a context manager).

    On enter it writes the lease and starts a daemon thread refreshing it; on exit it stops the
    thread and removes the lease (only if still its own). If another worker took the job over
    (this one was presumed lost, e.g. after a long stall), the keeper stops refreshing and sets
    :attr:`lost`, so the job's loop can stop without touching the row.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        self._write()
        self._thread = threading.Thread(target=self._beat, name="job-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lease = read_lease(self.path)
        if lease is not None and lease.is_mine():
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json.dumps(asdict(Lease.mine())).encode(), self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            current = read_lease(self.path)
            if current is not None and not current.is_mine():
                logger.error(
                    "%s was taken over by %s (pid %d)", self.path, current.host, current.pid
                )
                self.lost = True
                return
            try:
                self._write()
            except OSError:
                logger.warning("could not refresh the job lease %s", self.path, exc_info=True)
