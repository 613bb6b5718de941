"""Labels: versioned label volumes per image (every save kept; one ``final`` per image)."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from segassist.models.runtime._atomic import commit_file
from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.server.auth import require_role
from segassist.server.db.tables import (
    FINAL_TAG,
    PREVIOUS_TAG,
    Image,
    Label,
    Role,
    default_schema,
    new_id,
)
from segassist.server.deps import IdPath, SessionDep, SettingsDep, StorageDep
from segassist.server.dicom_results import store_label_on_server
from segassist.server.errors import not_found, unprocessable
from segassist.server.ingest import validate_label
from segassist.server.routes.images import remove_stored, typed_upload_path
from segassist.server.schemas import LabelPublic
from segassist.server.storage import Storage, temporary_path
from segassist.server.uploads import multipart_openapi, receive_upload, release_connection

__all__ = ["router", "store_label"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["labels"])

_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Version numbering and the final-tag swap of one image must not interleave (same process);
# PostgreSQL additionally locks the image row for other processes.
_VERSION_LOCK = threading.Lock()


def store_label(
    session: Session, storage: Storage, image: Image, src: Path, tag: str
) -> LabelPublic:
    """Validate the label volume at ``src`` against ``image`` and the dataset's schema (an empty
    schema is filled from it) and store it as the next version, tagged ``tag``. Shared by the
    REST upload and the MONAI Label datastore."""
    dataset = image.dataset
    open_schema = not dataset.labels
    allowed = set(range(IGNORE_INDEX + 1)) if open_schema else dataset.label_values()
    folder = storage.label_path(image.id, 0).parent
    with temporary_path(folder, suffix=".nii.gz") as validated:
        info = validate_label(src, validated, Path(image.path), allowed)
        if open_schema:
            dataset.labels = default_schema(int(c) for c in info.classes_present)
        with _VERSION_LOCK:
            session.execute(select(Image.id).where(Image.id == image.id).with_for_update())
            version = 1 + (
                session.scalar(select(func.max(Label.version)).where(Label.image_id == image.id))
                or 0
            )
            dst = storage.label_path(image.id, version)
            try:
                if tag == FINAL_TAG:
                    session.execute(
                        update(Label)
                        .where(Label.image_id == image.id, Label.tag == FINAL_TAG)
                        .values(tag=PREVIOUS_TAG)
                    )
                label = Label(
                    id=new_id(),
                    image_id=image.id,
                    version=version,
                    tag=tag,
                    path=str(dst),
                    sha256=info.sha256,
                    classes_present=sorted(int(c) for c in info.classes_present),
                    annotated_slices={
                        str(axis): sorted(int(i) for i in indices)
                        for axis, indices in info.annotated_slices.items()
                    },
                )
                session.add(label)
                session.flush()
                commit_file(validated, dst)
                session.commit()
            except BaseException:
                session.rollback()
                remove_stored(dst)
                raise
    logger.info("stored label v%d (%s) of image %s", version, tag, image.id)
    store_label_on_server(image, dst, version)  # DICOMweb datasets: STOW-RS as DICOM-SEG
    return LabelPublic.model_validate(label)


@router.post(
    "/images/{image_id}/labels",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=multipart_openapi(
        tag={"type": "string", "default": FINAL_TAG, "pattern": f"^({_TAG.pattern[1:-1]})?$"}
    ),
    dependencies=[Depends(require_role(Role.annotator))],
)
async def upload_label(
    image_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> LabelPublic:
    """Save a new label version (multipart ``file``: NIfTI on the image's grid; 255 = unannotated).

    Values must be 0, 255 or a class of the dataset's schema (422 names the others). Tag ``final``
    (default) re-tags the previous final version as ``previous``; every version is kept.
    """
    image = await run_in_threadpool(session.get, Image, image_id)
    if image is None:
        raise not_found("image", image_id)
    await release_connection(session)
    with storage.upload_tmp() as tmp:
        upload = await receive_upload(request, tmp, settings.max_upload_bytes)
        tag = upload.fields.get("tag") or FINAL_TAG
        if not _TAG.fullmatch(tag):
            raise unprocessable(f"tag {tag!r} must be 1-64 letters, digits, '_', '-' or '.'")
        typed = typed_upload_path(upload)
        try:
            return await run_in_threadpool(store_label, session, storage, image, typed, tag)
        finally:
            typed.unlink(missing_ok=True)


@router.get("/images/{image_id}/labels")
def list_labels(image_id: IdPath, session: SessionDep) -> list[LabelPublic]:
    """Every label version of an image, newest first."""
    if session.get(Image, image_id) is None:
        raise not_found("image", image_id)
    labels = session.scalars(
        select(Label).where(Label.image_id == image_id).order_by(Label.version.desc())
    ).all()
    return [LabelPublic.model_validate(label) for label in labels]


@router.get("/labels/{label_id}/file", response_class=FileResponse)
def download_label(label_id: IdPath, session: SessionDep) -> FileResponse:
    """The stored label NIfTI of one version."""
    label = session.get(Label, label_id)
    if label is None:
        raise not_found("label", label_id)
    return FileResponse(
        label.path,
        media_type="application/gzip",
        filename=f"{label.image_id}_v{label.version}.nii.gz",
    )
