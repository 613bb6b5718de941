"""On-disk datastore: the path of every stored file, and atomic writes.

Layout under ``data_dir`` (docs/internals.md)::

    images/<image_id>/image.nii.gz
    labels/<image_id>/v<version>.nii.gz
    models/<model_id>/…                  (model.onnx + manifest.json, or encoder.pt + manifest.json)
    jobs/<job_id>/log.txt, jobs/<job_id>/work/
    predictions/<model_id>/<image_id>/{labels,clusters,probabilities,uncertainty}.nii.gz, clusters.png
    uploads/                              (temporary upload files, same filesystem as the rest)
    broker/                               (embedded Celery filesystem transport)

Every write goes through :mod:`segassist.models.runtime._atomic` (temporary file in the destination folder,
fsync, the configured permissions, ``os.replace``), so a reader sees either the old file, the
whole new file, or nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from segassist.models.runtime._atomic import atomic_write_bytes, atomic_write_chunks, is_staged

__all__ = [
    "Storage",
    "UploadTooLargeError",
    "atomic_write_bytes",
    "atomic_write_stream",
    "file_lock",
    "temporary_path",
]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder): one process or thread
    at a time, across the API and workers that share the data directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


STALE_UPLOAD_SECONDS = 3600.0
"""A temporary upload file untouched this long belongs to an upload that died with its API."""


STAGED_TREES = ("images", "labels", "models", "predictions", "features", "jobs")
"""The datastore's folders that atomic writes stage under (:mod:`segassist.models.runtime._atomic`)."""


def _last_written(path: Path) -> float:
    """The latest modification time of ``path`` and, for a folder, of everything in it
    (0 if it vanished meanwhile)."""
    try:
        if path.is_dir():
            return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class UploadTooLargeError(ValueError):
    """A stream exceeded its byte limit; nothing was written."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"upload exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


@contextmanager
def temporary_path(directory: Path, suffix: str = "") -> Iterator[Path]:
    """A fresh, empty temporary file path in ``directory``, removed on exit if still there."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def atomic_write_stream(
    chunks: Iterable[bytes], dst: Path, max_bytes: int | None = None
) -> tuple[str, int]:
    """Stream ``chunks`` to ``dst`` atomically; returns ``(sha256 hex, size in bytes)``.

    Chunks are hashed and written as they come (never held whole in memory). If the stream
    raises or exceeds ``max_bytes`` (:class:`UploadTooLargeError`), the temporary file is
    removed and ``dst`` is left as it was.
    """

    def limited() -> Iterator[bytes]:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise UploadTooLargeError(max_bytes)
            yield chunk

    return atomic_write_chunks(limited(), dst)


class Storage:
    """Paths of the datastore under ``data_dir`` (folders are created on demand by writers).

    Args:
        data_dir: root folder; created if missing.
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def image_path(self, image_id: str) -> Path:
        """Stored NIfTI of an image."""
        return self.root / "images" / image_id / "image.nii.gz"

    def label_path(self, image_id: str, version: int) -> Path:
        """Stored NIfTI of one label version of an image."""
        return self.root / "labels" / image_id / f"v{version}.nii.gz"

    def model_dir(self, model_id: str) -> Path:
        """Artifact folder of a registered model."""
        return self.root / "models" / model_id

    def job_dir(self, job_id: str) -> Path:
        """Folder of a job (log and work files)."""
        return self.root / "jobs" / job_id

    def job_log(self, job_id: str) -> Path:
        """Plain-text log of a job."""
        return self.job_dir(job_id) / "log.txt"

    def job_workdir(self, job_id: str) -> Path:
        """Scratch folder of a job (checkpoints); kept across retries so training resumes."""
        return self.job_dir(job_id) / "work"

    def prediction_dir(self, model_id: str, image_id: str) -> Path:
        """Outputs of a model on an image."""
        return self.root / "predictions" / model_id / image_id

    def uploads_dir(self) -> Path:
        """Temporary upload files (same filesystem as the datastore, so moves are atomic)."""
        return self.root / "uploads"

    def broker_dir(self) -> Path:
        """Embedded Celery filesystem transport."""
        return self.root / "broker"

    def remove_stale_staging(self, older_than_seconds: float = STALE_UPLOAD_SECONDS) -> int:
        """Delete the staged files and folders of atomic writes (:func:`is_staged`) under the
        datastore's trees (:data:`STAGED_TREES`) that nothing has written to for
        ``older_than_seconds``: left by a worker or API killed mid-write, never read, holding
        disk (a feature cache's staging folder holds gigabytes). Returns how many."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for tree in STAGED_TREES:
            for folder, dirs, files in os.walk(self.root / tree):
                for name in [*dirs, *files]:
                    path = Path(folder) / name
                    if is_staged(name) and _last_written(path) < cutoff:
                        if path.is_dir():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink(missing_ok=True)
                        removed += 1
                dirs[:] = [name for name in dirs if not is_staged(name)]
        return removed

    def remove_stale_uploads(self, older_than_seconds: float = STALE_UPLOAD_SECONDS) -> int:
        """Delete temporary upload files not written for ``older_than_seconds`` (left by an API
        killed mid-upload: its cleanup never ran); returns how many. A live upload writes its
        file continuously, so it is never that old."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.uploads_dir().glob(".tmp-*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    @contextmanager
    def upload_tmp(self, suffix: str = "") -> Iterator[Path]:
        """A temporary path under :meth:`uploads_dir`, removed on exit."""
        with temporary_path(self.uploads_dir(), suffix=suffix) as path:
            yield path
