"""Checks and resolution of an assist request, once, on the server (torch-free).

``POST /datasets/{id}/assist`` turns what a client asks (:class:`segassist.server.schemas.AssistCreate`)
into the params of one ``assist`` job (:mod:`segassist.worker.assist`): the label versions (default: every
image's ``final`` one), the images to segment (default: every image of the dataset), the slice
axis and the encoder, all checked here so a bad request is a 4xx naming the problem instead of a
job failing minutes later, and fixed in the params so a retried job works on what was submitted.

Slice axis: a label volume annotates slices along an axis when some but not all of its slices
along it hold annotated voxels (≠ 255); the axis with the fewest annotated slices is the
annotation axis. Every label of one request must agree. Fully annotated volumes (no such axis)
use the axis of largest voxel spacing (the acquisition's slice direction), the last one on ties.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from fastapi import HTTPException, status
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from segassist.server.db.tables import (
    FINAL_TAG,
    Dataset,
    Image,
    JobKind,
    Label,
    ModelKind,
    ModelRecord,
)
from segassist.server.errors import not_found, unprocessable
from segassist.server.routes.jobs import submit_job
from segassist.server.schemas import AssistCreate

__all__ = ["annotation_axis", "prefetch_features", "resolve_assist"]

logger = logging.getLogger(__name__)


def annotation_axis(label: Label, image: Image) -> int | None:
    """The axis along which ``label`` annotates a strict subset of slices, or ``None``."""
    counts = {int(a): len(indices) for a, indices in (label.annotated_slices or {}).items()}
    sparse = {a: n for a, n in counts.items() if 0 < n < int(image.shape[a])}
    return min(sparse, key=lambda a: (sparse[a], -a)) if sparse else None


def _largest_spacing_axis(image: Image) -> int:
    spacing = [float(s) for s in image.spacing[:3]]
    return max(range(3), key=lambda a: (spacing[a], a))


def _labels(session: Session, dataset: Dataset, body: AssistCreate) -> list[tuple[Label, Image]]:
    query = select(Label, Image).join(Image).where(Image.dataset_id == dataset.id)
    if body.label_ids is None:
        rows = [
            (label, image) for label, image in session.execute(query.where(Label.tag == FINAL_TAG))
        ]
        if not rows:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"dataset {dataset.id!r} has no labels yet: save a label volume (tag "
                f"'{FINAL_TAG}') with a few annotated slices for at least one image first",
            )
        return rows
    chosen = session.execute(query.where(Label.id.in_(body.label_ids)))
    rows = [(label, image) for label, image in chosen]
    found = {label.id for label, _ in rows}
    missing = [i for i in body.label_ids if i not in found]
    if missing:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"labels not found in dataset {dataset.id!r}: {missing}"
        )
    images = [image.id for _, image in rows]
    if len(set(images)) != len(images):
        raise unprocessable("label_ids holds two versions of the same image's labels")
    return rows


def _targets(session: Session, dataset: Dataset, image_ids: list[str] | None) -> list[str]:
    query = select(Image.id).where(Image.dataset_id == dataset.id)
    if image_ids is None:
        return list(session.scalars(query.order_by(Image.created_at)))
    found = set(session.scalars(query.where(Image.id.in_(image_ids))))
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"images not found in dataset {dataset.id!r}: {missing}"
        )
    return list(dict.fromkeys(image_ids))


def _check_encoder(session: Session, dataset: Dataset, encoder_id: str) -> None:
    model = session.get(ModelRecord, encoder_id)
    if model is None:
        raise not_found("encoder", encoder_id)
    if model.kind != ModelKind.encoder:
        raise unprocessable(f"model {encoder_id!r} is a {model.kind}, not an encoder")
    if model.modality.lower() != dataset.modality.lower():
        raise unprocessable(
            f"encoder {encoder_id!r} was trained on {model.modality}, "
            f"dataset {dataset.id!r} is {dataset.modality}"
        )


def resolve_assist(session: Session, dataset: Dataset, body: AssistCreate) -> dict[str, Any]:
    """The params of the assist job for ``body``; raises an HTTP 4xx naming what is wrong."""
    if body.objective == "none" and body.method == "linear":
        raise unprocessable(
            "objective 'none' (random initialisation) needs method 'finetune', 'mean_teacher' "
            "or 'auto': a probe head reads a pretrained encoder's features"
        )
    if body.encoder_id is not None:
        if body.objective == "none":
            raise unprocessable("give either encoder_id or objective 'none', not both")
        _check_encoder(session, dataset, body.encoder_id)
    rows = _labels(session, dataset, body)
    empty = [
        label.id
        for label, _ in rows
        if not label.classes_present and not any((label.annotated_slices or {}).values())
    ]
    if empty:
        raise unprocessable(
            f"labels {empty} annotate no voxel (every value is 255): paint a few slices first"
        )
    axes = {label.id: annotation_axis(label, image) for label, image in rows}
    sparse_axes = {a for a in axes.values() if a is not None}
    if len(sparse_axes) > 1:
        raise unprocessable(
            f"the labels annotate slices along different axes ({axes}): annotate every image "
            "along the same axis"
        )
    if body.axis is not None:
        axis = body.axis
    elif sparse_axes:
        axis = sparse_axes.pop()
    else:
        axis = _largest_spacing_axis(rows[0][1])
    if not any(c > 0 for label, _ in rows for c in label.classes_present):
        raise unprocessable(
            "the labels hold background only: annotate at least one voxel of a class"
        )
    params = body.model_dump(mode="json", exclude_none=True, exclude={"config"})
    if body.config is not None:
        params["config"] = body.config.model_dump(mode="json", exclude_unset=True)
    params |= {
        "label_ids": [label.id for label, _ in rows],
        "image_ids": _targets(session, dataset, body.image_ids),
        "axis": axis,
    }
    return params


def prefetch_features(session: Session, celery: Celery, dataset: Dataset, image_id: str) -> None:
    """Queue the caching of a new image's decoder maps when an encoder of its modality exists,
    so the first assist on it after labelling costs only the head. Best effort: a broker error
    is logged, the upload stands."""
    image = session.get(Image, image_id)
    has_encoder = exists().where(
        ModelRecord.kind == ModelKind.encoder, ModelRecord.modality == dataset.modality
    )
    if image is None or not session.scalar(select(has_encoder)):
        return
    params = {"image_ids": [image.id], "axis": _largest_spacing_axis(image)}
    try:
        submit_job(session, celery, JobKind.features, dataset, params)
    except HTTPException as exc:
        logger.warning("features of image %s not prefetched: %s", image.id, exc.detail)
