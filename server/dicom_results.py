"""Predictions and labels of DICOM-sourced images as DICOM-SEG files, and STOW-RS of them.

``predictions/<model_id>/<image_id>/segmentation.dcm`` is built on first request from
``labels.nii.gz``, the dataset's label schema and the source series' headers
(:mod:`segassist.server.dicom_headers`), and kept (rebuilt if the labels file is newer). A label version of
an image of a DICOMweb dataset is stored on the dataset's server as a MANUAL segmentation when it
is saved (:func:`store_label_on_server`); a prediction on request (:func:`stow_prediction`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi import HTTPException, status
from pydicom.dataset import Dataset as DicomDataset
from sqlalchemy.orm import Session

from segassist.models.runtime.nifti import read_nifti
from segassist.server.db.tables import Dataset, Image
from segassist.server.dicom_headers import headers_path, read_headers
from segassist.server.dicom_seg import SegmentClass, build_segmentation
from segassist.server.dicomweb_images import dataset_server
from segassist.server.errors import not_found
from segassist.server.predictions import PREDICTION_FILES
from segassist.server.storage import Storage, atomic_write_bytes

__all__ = [
    "SEGMENTATION_FILE",
    "prediction_segmentation",
    "schema_classes",
    "source_instances",
    "store_label_on_server",
    "stow_prediction",
]

logger = logging.getLogger(__name__)

SEGMENTATION_FILE = "segmentation.dcm"
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def source_instances(image: Image) -> list[DicomDataset]:
    """The headers of ``image``'s source series in stacking order.

    Raises:
        HTTPException: 409 when the image did not come from DICOM, or its series lacks the UIDs
            a DICOM-SEG must reference.
    """
    path = headers_path(Path(image.path))
    if image.source == "nifti" or not path.is_file():
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"image {image.id!r} ({image.name!r}) was uploaded as NIfTI, not from DICOM: a "
            "DICOM-SEG must reference the source DICOM series (upload the series as a zip, or "
            "use a DICOMweb dataset); download labels.nii.gz instead",
        )
    instances = read_headers(path)
    missing = [key for key in _REQUIRED_UIDS if not str(instances[0].get(key, "") or "")]
    if missing:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"the DICOM series of image {image.id!r} has no {', '.join(missing)} (anonymised "
            "without UIDs?): a DICOM-SEG cannot reference it",
        )
    return instances


def schema_classes(dataset: Dataset) -> list[SegmentClass]:
    """The dataset's label schema as segments (value order)."""
    schema = sorted((int(value), entry) for value, entry in (dataset.labels or {}).items())
    return [
        SegmentClass(value, str(entry.get("name") or f"class {value}"), _color(entry))
        for value, entry in schema
    ]


def _color(entry: dict[str, Any]) -> str:
    return str(entry.get("color") or "#ff0000")


def _segmentation_bytes(
    labels_path: Path, image: Image, *, automatic: bool, description: str
) -> bytes:
    instances = source_instances(image)
    data, _, _ = read_nifti(labels_path)
    labels = np.asarray(data, dtype=np.uint8)
    classes = schema_classes(image.dataset)
    if not classes:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"dataset {image.dataset_id!r} has no label classes yet: nothing to name the "
            "segments with",
        )
    try:
        segmentation = build_segmentation(
            labels, instances, classes, automatic=automatic, description=description
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"image {image.id!r}: {exc}") from exc
    buffer = io.BytesIO()
    segmentation.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def prediction_segmentation(
    session: Session, storage: Storage, model_id: str, image_id: str
) -> Path:
    """The DICOM-SEG of ``model_id``'s prediction on ``image_id``, built now if missing or stale.

    Raises:
        HTTPException: 404 without an image or prediction; 409 when the image did not come
            from DICOM.
    """
    image = session.get(Image, image_id)
    if image is None:
        raise not_found("image", image_id)
    source_instances(image)  # 409 first for an image that did not come from DICOM
    folder = storage.prediction_dir(model_id, image_id)
    labels_path = folder / PREDICTION_FILES["labels"]
    if not labels_path.is_file():
        raise not_found(f"prediction of model {model_id!r} on image", image_id)
    out = folder / SEGMENTATION_FILE
    if out.is_file() and out.stat().st_mtime_ns >= labels_path.stat().st_mtime_ns:
        return out
    content = _segmentation_bytes(
        labels_path, image, automatic=True, description=f"segassist {model_id[:8]}"
    )
    atomic_write_bytes(content, out)
    logger.info("built DICOM-SEG of model %s on image %s", model_id, image_id)
    return out


def _receipt(server_url: str, segmentation: DicomDataset) -> dict[str, Any]:
    return {
        "server": server_url,
        "study_uid": str(segmentation.StudyInstanceUID),
        "series_uid": str(segmentation.SeriesInstanceUID),
        "sop_instance_uid": str(segmentation.SOPInstanceUID),
    }


def stow_prediction(
    session: Session, storage: Storage, model_id: str, image_id: str
) -> dict[str, Any]:
    """Store the prediction's DICOM-SEG on the image's dataset's DICOMweb server (STOW-RS)."""
    path = prediction_segmentation(session, storage, model_id, image_id)
    image = session.get(Image, image_id)
    if image is None:  # pragma: no cover - checked by prediction_segmentation
        raise not_found("image", image_id)
    server = dataset_server(image.dataset)
    segmentation = pydicom.dcmread(path)
    server.store([segmentation])
    return _receipt(server.url, segmentation)


def store_label_on_server(image: Image, label_path: Path, version: int) -> dict[str, Any] | None:
    """Store a saved label version of an image of a DICOMweb dataset on its server as a MANUAL
    DICOM-SEG (None for other images). The label is already saved: a failure says so."""
    if image.source != "dicomweb" or not image.dataset.dicomweb:
        return None
    server = dataset_server(image.dataset)
    try:
        content = _segmentation_bytes(
            label_path, image, automatic=False, description=f"segassist label v{version}"
        )
        segmentation = pydicom.dcmread(io.BytesIO(content))
        server.store([segmentation])
    except HTTPException as exc:
        raise HTTPException(
            exc.status_code,
            f"label v{version} of image {image.id!r} was saved in segassist, but storing it "
            f"as DICOM-SEG on the DICOMweb server failed: {exc.detail}",
        ) from exc
    return _receipt(server.url, segmentation)
