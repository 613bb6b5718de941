"""``/models``: the registry of encoders and segmenters, and predictions with a segmenter."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, status
from sqlalchemy import select

from segassist.server.auth import CurrentPrincipal, require_role
from segassist.server.db.tables import Image, JobKind, ModelKind, ModelRecord, Role
from segassist.server.deps import CeleryDep, IdPath, IdQuery, SessionDep
from segassist.server.errors import not_found, unprocessable
from segassist.server.routes.jobs import submit_job
from segassist.server.schemas import JobPublic, ModelPublic, PredictionCreate, PredictParams

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(
    session: SessionDep,
    kind: ModelKind | None = None,
    dataset_id: IdQuery = None,
    modality: str | None = None,
) -> list[ModelPublic]:
    """Registry entries, newest first, filtered by kind, dataset and/or modality."""
    query = select(ModelRecord).order_by(ModelRecord.created_at.desc())
    if kind is not None:
        query = query.where(ModelRecord.kind == kind)
    if dataset_id is not None:
        query = query.where(ModelRecord.dataset_id == dataset_id)
    if modality is not None:
        query = query.where(ModelRecord.modality == modality)
    return [ModelPublic.model_validate(model) for model in session.scalars(query)]


@router.get("/{model_id}")
def get_model(model_id: IdPath, session: SessionDep) -> ModelPublic:
    """One registry entry with its lineage and metrics."""
    model = session.get(ModelRecord, model_id)
    if model is None:
        raise not_found("model", model_id)
    return ModelPublic.model_validate(model)


@router.post(
    "/{model_id}/predict",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_role(Role.annotator))],
)
def predict(
    model_id: IdPath,
    body: PredictionCreate,
    session: SessionDep,
    celery: CeleryDep,
    principal: CurrentPrincipal,
) -> JobPublic:
    """Segment one stored image with a segmenter: a ``predict`` job on the prediction queue.

    A worker runs ONNX Runtime (the API never does) and writes the outputs under
    ``predictions/<model_id>/<image_id>/`` on the image's affine; poll ``/jobs/{id}``, whose
    ``result.predictions[image_id]`` holds the download URLs (``GET /predictions/…``).
    """
    model = session.get(ModelRecord, model_id)
    if model is None:
        raise not_found("model", model_id)
    if model.kind != ModelKind.segmenter:
        raise unprocessable(f"model {model_id!r} is an {model.kind}; predict needs a segmenter")
    image = session.get(Image, body.image_id)
    if image is None:
        raise not_found("image", body.image_id)
    if not (Path(model.folder) / "manifest.json").is_file():
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"artifacts of model {model_id!r} are missing"
        )
    dataset = image.dataset
    if model.modality.lower() != dataset.modality.lower():
        raise unprocessable(
            f"segmenter {model_id!r} was trained on {model.modality}, "
            f"image {image.id!r} is {dataset.modality}"
        )
    params = PredictParams(
        model_id=model.id, image_ids=[image.id], probabilities=body.probabilities
    ).model_dump(mode="json")
    return submit_job(session, celery, JobKind.predict, dataset, params, principal.user_id)
