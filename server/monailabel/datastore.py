"""Uploads through the MONAI Label datastore routes, stored by segassist's own image/label store.

Images: a NIfTI, a zipped DICOM series or an NRRD (Slicer's ``.nrrd`` file-extension setting,
converted to NIfTI on the same world grid). The client's name for the image (``?image=``, else the
file's base name without its suffixes; Slicer sends an absolute temporary path) becomes the
image's name; uploading the same bytes under the same name again returns the stored image.

Labels: converted by :mod:`segassist.server.monailabel.sparse` (viewer zeros → sparse labels, segment
numbers → dataset classes by name), then stored as a new label version like
``POST /api/v1/images/{id}/labels``. For an image that came from DICOM, a header-less buffer of
the series' frames in the viewer's order (OHIF's ``label.bin``) is accepted too
(:func:`segassist.server.series_order.raw_series_label`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.nifti import read_nifti
from segassist.server.assist import prefetch_features
from segassist.server.db.tables import Dataset, Image
from segassist.server.errors import unprocessable
from segassist.server.ingest import IngestError
from segassist.server.monailabel.apps import App, class_names, default_dataset, find_image
from segassist.server.monailabel.sparse import annotation_axis, map_segments, sparse_from_viewer
from segassist.server.monailabel.volumes import NRRD_MAGIC, dicom_modality, nrrd_to_nifti
from segassist.server.routes.images import store_image as store_nifti_image
from segassist.server.routes.images import typed_upload_path
from segassist.server.routes.labels import store_label
from segassist.server.series_order import raw_series_label
from segassist.server.settings import Settings
from segassist.server.storage import Storage
from segassist.server.uploads import ReceivedUpload

__all__ = ["TAG", "parse_params", "save_label", "store_image", "upload_name"]

TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SUFFIXES = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.zip|\.gz)$", re.IGNORECASE)


def parse_params(raw: str | None) -> dict[str, Any]:
    """The JSON ``params`` form field (absent or empty = ``{}``); 422 when not a JSON object."""
    if not raw or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise unprocessable(f"params is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise unprocessable(f"params must be a JSON object, got {type(value).__name__}")
    return value


def upload_name(filename: str, given: str | None) -> str:
    """The image's name: ``given``, else the base name of ``filename`` without its suffixes."""
    if given and given.strip():
        return given.strip()[:255]
    base = re.split(r"[\\/]", filename or "")[-1]
    return (_SUFFIXES.sub("", base) or "image")[:255]


@contextmanager
def volume_file(upload: ReceivedUpload, storage: Storage) -> Iterator[Path]:
    """The uploaded volume as a file whose suffix says its kind (``.nii``, ``.nii.gz``,
    ``.zip``), an NRRD converted to ``.nii.gz`` first; removed on exit."""
    with upload.path.open("rb") as handle:
        magic = handle.read(len(NRRD_MAGIC))
    if magic == NRRD_MAGIC:
        with storage.upload_tmp(suffix=".nii.gz") as converted:
            nrrd_to_nifti(upload.path, converted)
            yield converted
        return
    typed = typed_upload_path(upload)
    try:
        yield typed
    finally:
        typed.unlink(missing_ok=True)


def _dataset_for_upload(
    session: Session, settings: Settings, storage: Storage, app: App, src: Path
) -> Dataset:
    if app.dataset is not None:
        return app.dataset
    modality = dicom_modality(src) if src.suffix == ".zip" else None
    dataset = default_dataset(session, settings, storage, create=True, modality=modality)
    if dataset is None:  # pragma: no cover - create=True always returns one
        raise RuntimeError("default dataset not created")
    app.dataset = dataset
    return dataset


def store_image(
    session: Session,
    settings: Settings,
    storage: Storage,
    celery: Celery,
    app: App,
    upload: ReceivedUpload,
    name: str,
) -> Image:
    """Store an uploaded volume in the app's dataset (made now if it is the default one)."""
    with volume_file(upload, storage) as src:
        dataset = _dataset_for_upload(session, settings, storage, app, src)
        same = session.scalar(
            select(Image)
            .where(Image.dataset_id == dataset.id, Image.name == name)
            .order_by(Image.created_at.desc())
            .limit(1)
        )
        if same is not None and same.sha256 == upload.sha256:
            return same
        stored = store_nifti_image(session, storage, dataset.id, src, name)
    prefetch_features(session, celery, dataset, stored.id)
    image = session.get(Image, stored.id)
    if image is None:  # pragma: no cover - just committed
        raise RuntimeError(f"image {stored.id} vanished")
    return image


def _integer_labels(data: np.ndarray) -> np.ndarray:
    if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.round(data))):
        raise IngestError("label values must be integers (segment numbers)")
    if data.size and (data.min() < 0 or data.max() > IGNORE_INDEX):
        raise IngestError(
            f"label values must lie within 0…{IGNORE_INDEX}, found {data.min()}…{data.max()}"
        )
    return np.asarray(data, dtype=np.uint8)


def _params_axis(params: dict[str, Any], image: Image, painted: np.ndarray) -> int:
    axis = params.get("axis")
    if axis is None:
        return annotation_axis(image.spacing, painted)
    if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis <= 2:
        raise unprocessable(f"params.axis must be 0, 1 or 2, got {axis!r}")
    return axis


def save_label(
    session: Session,
    storage: Storage,
    app: App,
    image_ref: str,
    upload: ReceivedUpload,
    tag: str,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Convert and store a viewer's label volume; returns the MONAI Label answer."""
    dataset = app.require()
    image = find_image(session, dataset, image_ref, storage=storage)
    if not TAG.match(tag):
        raise unprocessable(f"tag {tag!r} must be 1-64 letters, digits, '_', '-' or '.'")
    annotated = params.get("annotated_slices")
    if (
        annotated is not None
        and annotated != "all"
        and not (isinstance(annotated, list) and all(isinstance(i, int) for i in annotated))
    ):
        raise unprocessable("params.annotated_slices must be a list of slice indices or 'all'")
    shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
    raw = raw_series_label(upload.path, shape) if image.source != "nifti" else None
    with volume_file(upload, storage) as src:
        if raw is not None:  # OHIF: the series' frames as they are in the viewer
            data, affine = raw, np.asarray(image.affine, dtype=np.float64)
        elif src.suffix == ".zip":
            raise IngestError("a label must be a NIfTI or NRRD volume, not a zip archive")
        else:
            try:
                data, affine, _ = read_nifti(src)
            except Exception as exc:
                raise IngestError(f"label is not a readable NIfTI or NRRD volume: {exc}") from exc
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if tuple(data.shape) != tuple(image.shape):
            raise IngestError(
                f"label of shape {tuple(data.shape)} is not on the grid of image {image.id!r} "
                f"{tuple(image.shape)}: save the label on the image's voxel grid"
            )
        axis = _params_axis(params, image, data)
        try:
            values, schema = map_segments(
                _integer_labels(data), params.get("label_info"), dict(dataset.labels or {})
            )
            sparse, slices = sparse_from_viewer(values, axis, annotated)
        except ValueError as exc:
            raise unprocessable(str(exc)) from exc
        if schema != (dataset.labels or {}):
            dataset.labels = schema  # committed with the label, or not at all
        with storage.upload_tmp(suffix=".nii.gz") as converted:
            nib.save(nib.Nifti1Image(sparse, affine), str(converted))
            stored = store_label(session, storage, image, converted, tag)
    names = class_names(dataset)
    return {
        "image": image.id,
        "label": image.id,
        "tag": tag,
        "version": stored.version,
        "label_version_id": stored.id,
        "axis": axis,
        "annotated_slices": slices,
        "classes": stored.classes_present,
        "label_names": {
            name: int(k)
            for k, name in zip(sorted(int(k) for k in dataset.labels), names, strict=True)
        },
    }
