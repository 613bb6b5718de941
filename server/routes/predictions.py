"""``/predictions``: download the files written by a prediction."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from segassist.server.deps import IdPath, StorageDep
from segassist.server.errors import not_found
from segassist.server.predictions import PREDICTION_FILES

__all__ = ["router"]

router = APIRouter(prefix="/predictions", tags=["predictions"])

_MEDIA = {".png": "image/png", ".gz": "application/gzip"}


@router.get("/{model_id}/{image_id}/{filename}", response_class=FileResponse)
def download_prediction(
    model_id: IdPath, image_id: IdPath, filename: str, storage: StorageDep
) -> FileResponse:
    """One output file (``labels.nii.gz``, ``clusters.nii.gz``, ``clusters.png``,
    ``probabilities.nii.gz``, ``uncertainty.nii.gz``)."""
    if filename not in PREDICTION_FILES.values():
        raise not_found("prediction file", filename)
    path = storage.prediction_dir(model_id, image_id) / filename
    if not path.is_file():
        raise not_found(f"{filename} of model {model_id!r} on image", image_id)
    return FileResponse(path, media_type=_MEDIA[path.suffix], filename=filename)
