"""``/models``: the registry of encoders and segmenters, and synchronous prediction."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select

from server.db.tables import Image, ModelKind, ModelRecord
from server.deps import PredictorsDep, SessionDep, StorageDep
from server.errors import not_found, unprocessable
from server.predictions import predict_to_folder, prediction_urls
from server.schemas import ModelPublic, PredictionCreate, PredictionPublic

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(
    session: SessionDep,
    kind: ModelKind | None = None,
    dataset_id: str | None = None,
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
def get_model(model_id: str, session: SessionDep) -> ModelPublic:
    """One registry entry with its lineage and metrics."""
    model = session.get(ModelRecord, model_id)
    if model is None:
        raise not_found("model", model_id)
    return ModelPublic.model_validate(model)


@router.post("/{model_id}/predict")
def predict(
    model_id: str,
    body: PredictionCreate,
    session: SessionDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> PredictionPublic:
    """Segment one stored image with a segmenter, synchronously (ONNX Runtime in this process).

    Outputs are written under ``predictions/<model_id>/<image_id>/`` on the image's affine and
    served by ``GET /predictions/…``.
    """
    model = session.get(ModelRecord, model_id)
    if model is None:
        raise not_found("model", model_id)
    if model.kind != ModelKind.segmenter:
        raise unprocessable(f"model {model_id!r} is an {model.kind}; predict needs a segmenter")
    image = session.get(Image, body.image_id)
    if image is None:
        raise not_found("image", body.image_id)
    folder = Path(model.folder)
    if not (folder / "manifest.json").is_file():
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"artifacts of model {model_id!r} are missing in {folder}"
        )
    try:
        names = predict_to_folder(
            predictors.get(folder),
            Path(image.path),
            storage.prediction_dir(model.id, image.id),
            with_probabilities=body.probabilities,
        )
    except ValueError as exc:
        raise unprocessable(
            f"cannot segment image {image.id!r} with model {model_id!r}: {exc}"
        ) from exc
    return PredictionPublic(
        model_id=model.id, image_id=image.id, urls=prediction_urls(model.id, image.id, names)
    )
