"""DICOM routes: a DICOMweb dataset's series, DICOM-SEG downloads, STOW-RS of predictions.

``GET /datasets/{id}/series`` lists the series of the dataset's DICOMweb server (QIDO-RS) with the
image each became, if fetched; ``POST /datasets/{id}/series/{series_uid}`` fetches one into the
datastore (:mod:`segassist.server.dicomweb_images`). ``GET /predictions/{model}/{image}/segmentation.dcm``
is a prediction of a DICOM-sourced image as DICOM-SEG, ``POST …/stow`` stores it on the dataset's
DICOMweb server (:mod:`segassist.server.dicom_results`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response, status
from fastapi.responses import FileResponse
from pydantic import BaseModel
from sqlalchemy import select

from segassist.server.auth import require_role
from segassist.server.db.tables import Dataset, Image, Role
from segassist.server.deps import IdPath, SessionDep, StorageDep
from segassist.server.dicom_results import (
    SEGMENTATION_FILE,
    prediction_segmentation,
    stow_prediction,
)
from segassist.server.dicomweb import RemoteSeries
from segassist.server.dicomweb_images import dataset_server, fetch_image, stored_series_image
from segassist.server.errors import not_found
from segassist.server.routes.images import image_publics
from segassist.server.schemas import ErrorPublic, ImagePublic

__all__ = ["DICOMWEB_RESPONSES", "SeriesPublic", "StowPublic", "router"]

router = APIRouter(tags=["dicom"])

DICOMWEB_RESPONSES: dict[int | str, dict[str, Any]] = {
    424: {"model": ErrorPublic, "description": "the DICOMweb server refused the credentials"},
    502: {"model": ErrorPublic, "description": "the DICOMweb server failed or answered badly"},
}
"""Answers of a route that calls the dataset's DICOMweb server (503: unreachable, declared for
every route by :mod:`segassist.server.openapi`)."""

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
SeriesUid = Annotated[
    str, Path(pattern=UID_PATTERN, max_length=64, description="a DICOM UID (SeriesInstanceUID)")
]


class SeriesPublic(RemoteSeries):
    """A series of the dataset's DICOMweb server; ``image_id`` once it has been fetched."""

    image_id: str | None = None


class StowPublic(BaseModel):
    """Where a DICOM-SEG was stored (``server`` without credentials)."""

    server: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str


def _dataset(session: SessionDep, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


@router.get("/datasets/{dataset_id}/series", responses=DICOMWEB_RESPONSES)
def list_series(
    dataset_id: IdPath,
    session: SessionDep,
    modality: Annotated[str | None, Query(max_length=16)] = None,
) -> list[SeriesPublic]:
    """The series of the dataset's DICOMweb server (QIDO-RS), optionally of one modality."""
    dataset = _dataset(session, dataset_id)
    remote = dataset_server(dataset).list_series(modality)
    stored = dict(
        session.execute(
            select(Image.series_uid, Image.id).where(
                Image.dataset_id == dataset.id, Image.series_uid.is_not(None)
            )
        ).all()
    )
    return [
        SeriesPublic(**series.model_dump(), image_id=stored.get(series.series_uid))
        for series in remote
    ]


@router.post(
    "/datasets/{dataset_id}/series/{series_uid}",
    dependencies=[Depends(require_role(Role.annotator))],
    responses={
        201: {"model": ImagePublic, "description": "fetched now"},
        200: {"model": ImagePublic, "description": "already stored"},
        **DICOMWEB_RESPONSES,
    },
)
def fetch_series(
    dataset_id: IdPath,
    series_uid: SeriesUid,
    session: SessionDep,
    storage: StorageDep,
    response: Response,
) -> ImagePublic:
    """Fetch a series of the dataset's DICOMweb server into the datastore (WADO-RS); the image.

    Idempotent: a stored series is returned as it is (200). 503 when the server is unreachable or
    breaks off (nothing is stored), 424 when it refuses the dataset's credentials, 404 when it
    has no such series, 422 when the series is not one evenly spaced stack.
    """
    dataset = _dataset(session, dataset_id)
    before = stored_series_image(session, dataset, series_uid)
    image = before or fetch_image(session, storage, dataset, series_uid)
    response.status_code = status.HTTP_200_OK if before is not None else status.HTTP_201_CREATED
    return image_publics(session, [image])[0]


@router.get(
    f"/predictions/{{model_id}}/{{image_id}}/{SEGMENTATION_FILE}",
    response_class=FileResponse,
)
def download_segmentation(
    model_id: IdPath, image_id: IdPath, session: SessionDep, storage: StorageDep
) -> FileResponse:
    """The prediction as DICOM-SEG referencing the source series (images from DICOM only: 409
    for a NIfTI upload)."""
    path = prediction_segmentation(session, storage, model_id, image_id)
    return FileResponse(path, media_type="application/dicom", filename=SEGMENTATION_FILE)


@router.post(
    "/predictions/{model_id}/{image_id}/stow",
    dependencies=[Depends(require_role(Role.annotator))],
    responses=DICOMWEB_RESPONSES,
)
def stow_segmentation(
    model_id: IdPath, image_id: IdPath, session: SessionDep, storage: StorageDep
) -> StowPublic:
    """Store the prediction's DICOM-SEG on the dataset's DICOMweb server (STOW-RS)."""
    receipt: dict[str, Any] = stow_prediction(session, storage, model_id, image_id)
    return StowPublic(**receipt)
