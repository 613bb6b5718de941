"""On-disk datastore: the path of every stored file, and atomic writes.

Layout under ``data_dir`` (docs/internals.md)::

    images/<image_id>/image.nii.gz
    labels/<image_id>/v<version>.nii.gz
    models/<model_id>/…                  (model.onnx + manifest.json, or encoder.pt + manifest.json)
    jobs/<job_id>/log.txt, jobs/<job_id>/work/
    predictions/<model_id>/<image_id>/{labels,clusters,probabilities,uncertainty}.nii.gz, clusters.png
    uploads/                              (temporary upload files, same filesystem as the rest)
    broker/                               (embedded Celery filesystem transport)

Every write goes to a temporary file in the destination folder and is moved into place with
``os.replace``, so a reader sees either the old file, the whole new file, or nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "Storage",
    "UploadTooLargeError",
    "atomic_write_bytes",
    "atomic_write_stream",
    "temporary_path",
]


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
    digest = hashlib.sha256()
    size = 0
    with temporary_path(dst.parent, suffix=".part") as tmp:
        with tmp.open("wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise UploadTooLargeError(max_bytes)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    return digest.hexdigest(), size


def atomic_write_bytes(data: bytes, dst: Path) -> str:
    """Write ``data`` to ``dst`` atomically; returns its sha256 hex."""
    digest, _ = atomic_write_stream([data], dst)
    return digest


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

    @contextmanager
    def upload_tmp(self, suffix: str = "") -> Iterator[Path]:
        """A temporary path under :meth:`uploads_dir`, removed on exit."""
        with temporary_path(self.uploads_dir(), suffix=suffix) as path:
            yield path
