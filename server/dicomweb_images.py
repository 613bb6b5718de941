"""Series of a DICOMweb dataset as images: fetched on demand, stored once, found by SeriesInstanceUID.

A DICOMweb dataset lists its server's series (QIDO-RS); a series becomes an image of the dataset
the first time something needs its voxels (``POST /datasets/{id}/series/{uid}``, or a MONAI Label
request naming the series): every instance is fetched (WADO-RS) into memory, stacked by the same
rules as a DICOM upload (:func:`segassist.server.dicom.series_to_volume`), stored as NIfTI with its headers
(:mod:`segassist.server.dicom_headers`) and checksummed. Only then is the image row written, so a fetch that
fails halfway (server stopped, bad series) leaves nothing behind. Later requests get the stored
image; concurrent fetches of one series wait for the first (a file lock per series).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from segassist.server.db.tables import Dataset, Image, new_id
from segassist.server.dicom_headers import headers_path
from segassist.server.dicomweb import DicomwebServer, DicomwebSettings
from segassist.server.ingest import store_dicom_volume
from segassist.server.storage import Storage, file_lock

__all__ = ["dataset_server", "fetch_image", "stored_series_image"]

logger = logging.getLogger(__name__)


def dataset_server(dataset: Dataset) -> DicomwebServer:
    """The DICOMweb server backing ``dataset``; 409 when it is an ordinary dataset."""
    if not dataset.dicomweb:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"dataset {dataset.id!r} is not backed by a DICOMweb server (create it with "
            "'dicomweb': {'url': …})",
        )
    return DicomwebServer(DicomwebSettings.from_row(dataset.dicomweb))


def stored_series_image(session: Session, dataset: Dataset, series_uid: str) -> Image | None:
    """The dataset's newest image of series ``series_uid``, if one is stored."""
    return session.scalar(
        select(Image)
        .where(Image.dataset_id == dataset.id, Image.series_uid == series_uid)
        .order_by(Image.created_at.desc(), Image.id.desc())
        .limit(1)
    )


def _series_lock(
    storage: Storage, dataset_id: str, series_uid: str
) -> AbstractContextManager[None]:
    digest = hashlib.sha256(series_uid.encode()).hexdigest()[:32]
    return file_lock(storage.root / "dicomweb" / f"{dataset_id}-{digest}.lock")


def fetch_image(
    session: Session,
    storage: Storage,
    dataset: Dataset,
    series_uid: str,
    on_instance: Callable[[int, int], None] | None = None,
) -> Image:
    """The image of series ``series_uid`` of the dataset's server, fetched now if not stored.

    Args:
        on_instance: called with ``(instances fetched, total)`` during a fetch.

    Raises:
        HTTPException: 409 for an ordinary dataset.
        DicomwebError: the server failed, refused the credentials or has no such series.
        IngestError: the series is not one stack of evenly spaced parallel slices.
    """
    from segassist.server.dicom import series_to_volume

    stored = stored_series_image(session, dataset, series_uid)
    if stored is not None:
        return stored
    server = dataset_server(dataset)
    with _series_lock(storage, dataset.id, series_uid):
        session.commit()  # end the read transaction: see an image another request stored
        stored = stored_series_image(session, dataset, series_uid)
        if stored is not None:
            return stored
        remote = server.find_series(series_uid)
        volume = series_to_volume(server.fetch_series(remote, on_instance))
        image_id = new_id()
        dst = storage.image_path(image_id)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            info = store_dicom_volume(volume, dst, headers_path(dst))
            image = Image(
                id=image_id,
                dataset_id=dataset.id,
                name=(remote.description or f"series {series_uid}")[:255],
                path=str(dst),
                shape=[int(n) for n in info.shape],
                spacing=[float(s) for s in info.spacing],
                affine=[[float(v) for v in row] for row in info.affine],
                dtype=str(info.dtype),
                sha256=info.sha256,
                size_bytes=int(info.size_bytes),
                source="dicomweb",
                series_uid=series_uid,
            )
            session.add(image)
            session.commit()
        except BaseException:
            session.rollback()
            shutil.rmtree(dst.parent, ignore_errors=True)
            raise
    logger.info(
        "stored series %s of %s as image %s %s", series_uid, server.url, image_id, image.shape
    )
    return image
