"""Images: streamed upload (NIfTI or zipped DICOM series), listing, download of the stored NIfTI."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fastapi import APIRouter, Depends, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from segassist.server.assist import prefetch_features
from segassist.server.auth import require_role
from segassist.server.db.tables import FINAL_TAG, Dataset, Image, Label, Role, new_id
from segassist.server.deps import CeleryDep, IdPath, SessionDep, SettingsDep, StorageDep
from segassist.server.dicom_headers import headers_path
from segassist.server.errors import not_found
from segassist.server.ingest import ingest_dicom_zip, ingest_nifti
from segassist.server.schemas import ImagePublic
from segassist.server.storage import Storage
from segassist.server.uploads import (
    ReceivedUpload,
    multipart_openapi,
    receive_upload,
    release_connection,
)

__all__ = ["image_publics", "remove_stored", "router", "store_image", "typed_upload_path"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["images"])

_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_SUFFIXES = re.compile(r"(\.nii\.gz|\.nii|\.zip|\.gz)$", re.IGNORECASE)


def image_publics(session: Session, images: list[Image]) -> list[ImagePublic]:
    """Response bodies of ``images`` with their label status (two queries for the whole list)."""
    ids = [image.id for image in images]
    versions: dict[str, int] = {}
    finals: dict[str, str] = {}
    if ids:
        versions = {
            image_id: int(n)
            for image_id, n in session.execute(
                select(Label.image_id, func.count(Label.id))
                .where(Label.image_id.in_(ids))
                .group_by(Label.image_id)
            ).all()
        }
        finals = {
            image_id: label_id
            for image_id, label_id in session.execute(
                select(Label.image_id, Label.id).where(
                    Label.image_id.in_(ids), Label.tag == FINAL_TAG
                )
            ).all()
        }
    return [
        ImagePublic(
            id=image.id,
            dataset_id=image.dataset_id,
            name=image.name,
            shape=image.shape,
            spacing=image.spacing,
            affine=image.affine,
            dtype=image.dtype,
            sha256=image.sha256,
            size_bytes=image.size_bytes,
            label_status="labelled" if image.id in finals else "unlabelled",
            final_label_id=finals.get(image.id),
            label_versions=versions.get(image.id, 0),
            source=image.source,
            series_uid=image.series_uid,
            created_at=image.created_at,
        )
        for image in images
    ]


def typed_upload_path(upload: ReceivedUpload) -> Path:
    """Give the received temporary file the suffix its content has (``.zip``, ``.nii.gz``, ``.nii``).

    The content decides, not the client's file name: zip and gzip are recognised by their magic
    bytes, anything else is handed to the NIfTI reader (which names the problem if it is not one).
    """
    with upload.path.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(_ZIP_MAGIC):
        suffix = ".zip"
    elif magic.startswith(_GZIP_MAGIC):
        suffix = ".nii.gz"
    else:
        suffix = ".nii"
    typed = upload.path.with_name(upload.path.name + suffix)
    os.replace(upload.path, typed)
    return typed


def remove_stored(path: Path) -> None:
    """Remove a stored file and its folder if that is left empty (undo of a failed upload)."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        logger.debug("kept non-empty folder %s", path.parent)


def store_image(
    session: Session, storage: Storage, dataset_id: str, src: Path, name: str
) -> ImagePublic:
    """Validate the upload at ``src`` and store it as image ``name`` of the dataset (NIfTI, the
    input's affine), with its row; nothing is kept if a step fails. Shared by the REST upload and
    the MONAI Label datastore."""
    image_id = new_id()
    dst = storage.image_path(image_id)
    dst.parent.mkdir(parents=True, exist_ok=True)
    is_dicom = src.suffix == ".zip"
    headers = headers_path(dst)
    try:
        if is_dicom:
            info = ingest_dicom_zip(src, dst, headers_dst=headers)
        else:
            info = ingest_nifti(src, dst)
        image = Image(
            id=image_id,
            dataset_id=dataset_id,
            name=name,
            path=str(dst),
            shape=[int(n) for n in info.shape],
            spacing=[float(s) for s in info.spacing],
            affine=[[float(v) for v in row] for row in info.affine],
            dtype=str(info.dtype),
            sha256=info.sha256,
            size_bytes=int(info.size_bytes),
            source="dicom" if is_dicom else "nifti",
            series_uid=info.series_uid or None,
        )
        session.add(image)
        session.commit()
    except BaseException:
        session.rollback()
        headers.unlink(missing_ok=True)
        remove_stored(dst)
        raise
    logger.info("stored image %s (%s, %d bytes)", image_id, image.shape, image.size_bytes)
    return image_publics(session, [image])[0]


@router.post(
    "/datasets/{dataset_id}/images",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=multipart_openapi(name={"type": "string"}),
    dependencies=[Depends(require_role(Role.annotator))],
)
async def upload_image(
    dataset_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    celery: CeleryDep,
) -> ImagePublic:
    """Upload a volume (multipart ``file``: .nii, .nii.gz or a .zip of one DICOM series).

    The body is streamed to a temporary file within ``max_upload_bytes`` (413 beyond), then
    validated and stored as NIfTI with the input's affine; nothing is kept if any step fails.
    When an encoder of the dataset's modality exists, a ``features`` job caches its decoder maps
    of the new image, so the first assist after labelling it costs only the head.
    """
    dataset = await run_in_threadpool(session.get, Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    await release_connection(session)
    with storage.upload_tmp() as tmp:
        upload = await receive_upload(request, tmp, settings.max_upload_bytes)
        typed = typed_upload_path(upload)
        try:
            name = upload.fields.get("name") or _SUFFIXES.sub("", upload.filename) or "image"
            stored = await run_in_threadpool(
                store_image, session, storage, dataset_id, typed, name[:255]
            )
        finally:
            typed.unlink(missing_ok=True)
    await run_in_threadpool(prefetch_features, session, celery, dataset, stored.id)
    return stored


@router.get("/datasets/{dataset_id}/images")
def list_images(dataset_id: IdPath, session: SessionDep) -> list[ImagePublic]:
    """Images of a dataset, oldest first."""
    if session.get(Dataset, dataset_id) is None:
        raise not_found("dataset", dataset_id)
    images = session.scalars(
        select(Image).where(Image.dataset_id == dataset_id).order_by(Image.created_at, Image.id)
    ).all()
    return image_publics(session, list(images))


@router.get("/images/{image_id}")
def get_image(image_id: IdPath, session: SessionDep) -> ImagePublic:
    """One image with its geometry and label status."""
    image = session.get(Image, image_id)
    if image is None:
        raise not_found("image", image_id)
    return image_publics(session, [image])[0]


@router.get("/images/{image_id}/file", response_class=FileResponse)
def download_image(image_id: IdPath, session: SessionDep) -> FileResponse:
    """The stored NIfTI (gzip), byte for byte what the checksum describes."""
    image = session.get(Image, image_id)
    if image is None:
        raise not_found("image", image_id)
    return FileResponse(image.path, media_type="application/gzip", filename=f"{image.id}.nii.gz")
