"""MONAI Label apps on segassist datasets: which dataset a request works on, and what it holds.

A MONAI Label *app* is one datastore plus its models. Here every dataset is an app (at
``/monailabel/<dataset id>/``), and the server's root is the app of the **default dataset**:
the one ``SEGASSIST_MONAILABEL_DATASET`` names, else a dataset made on the first upload through
the root (modality: the upload's DICOM Modality, else ``SEGASSIST_MONAILABEL_MODALITY``) whose id
is kept in ``<data_dir>/monailabel/default-dataset``. Reads before that answer as an empty app.

Image ids: MONAI Label clients name images themselves (Slicer uses the volume's node name when it
uploads, then refers to the image by that name), while segassist ids are 32 hex digits. An
``image`` parameter is therefore an image id of the dataset or, failing that, the name of its
newest image of that name, or its image of that SeriesInstanceUID (OHIF's image id; a series of a
DICOMweb dataset not stored yet is fetched). Listings and next-sample answers give the segassist
id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from segassist.models.runtime.configs import PretrainConfig
from segassist.models.runtime.manifest import Manifest
from segassist.server.db.tables import ID_PATTERN, Dataset, Image, Label, ModelKind, ModelRecord
from segassist.server.dicomweb_images import fetch_image, stored_series_image
from segassist.server.settings import Settings
from segassist.server.storage import Storage, atomic_write_bytes, file_lock

__all__ = [
    "CLUSTERS_MODEL",
    "MODELS",
    "SEGMENTATION_MODEL",
    "App",
    "class_names",
    "cluster_count",
    "datastore_json",
    "datastore_status",
    "default_dataset",
    "file_name",
    "find_image",
    "image_entry",
    "latest_segmenter",
    "monailabel_dir",
    "serving_segmenter",
    "unknown",
]

SEGMENTATION_MODEL = "segmentation"
CLUSTERS_MODEL = "clusters"
MODELS = (SEGMENTATION_MODEL, CLUSTERS_MODEL)
DEFAULT_DATASET_NAME = "monailabel"
_ID = re.compile(ID_PATTERN)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class App:
    """The dataset a MONAI Label request works on (``None``: the default one, not made yet)."""

    dataset: Dataset | None
    is_default: bool

    def require(self) -> Dataset:
        """The dataset, or 404 when the default one does not exist yet."""
        if self.dataset is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "no image has been uploaded yet: upload a volume first (PUT /datastore/image)",
            )
        return self.dataset


def unknown(what: str, name: str, choices: Sequence[str]) -> HTTPException:
    """404 naming the unknown ``what`` and the ones this server has."""
    return HTTPException(
        status.HTTP_404_NOT_FOUND, f"unknown {what} {name!r}: this server has {list(choices)}"
    )


def monailabel_dir(storage: Storage) -> Path:
    """Where the MONAI Label layer keeps its own small files (default dataset, sessions)."""
    return storage.root / "monailabel"


def default_dataset(
    session: Session,
    settings: Settings,
    storage: Storage,
    *,
    create: bool = False,
    modality: str | None = None,
) -> Dataset | None:
    """The root app's dataset; made (once, across processes) when ``create`` and missing."""
    if settings.monailabel_dataset:
        pinned = session.get(Dataset, settings.monailabel_dataset)
        if pinned is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"SEGASSIST_MONAILABEL_DATASET names dataset {settings.monailabel_dataset!r}, "
                "which does not exist",
            )
        return pinned
    marker = monailabel_dir(storage) / "default-dataset"

    def current() -> Dataset | None:
        text = marker.read_text().strip() if marker.is_file() else ""
        return session.get(Dataset, text) if _ID.fullmatch(text) else None

    dataset = current()
    if dataset is not None or not create:
        return dataset
    with file_lock(marker.with_name("default-dataset.lock")):
        dataset = current()
        if dataset is None:
            dataset = Dataset(
                name=DEFAULT_DATASET_NAME,
                modality=modality or settings.monailabel_modality,
                labels={},
            )
            session.add(dataset)
            session.commit()
            atomic_write_bytes(f"{dataset.id}\n".encode(), marker)
    return dataset


def find_image(
    session: Session,
    dataset: Dataset,
    ref: str,
    *,
    by_name: bool = True,
    storage: Storage | None = None,
) -> Image:
    """The dataset's image with id ``ref``, else (``by_name``) its newest image named ``ref`` or
    of SeriesInstanceUID ``ref`` (OHIF's image id); with ``storage``, a series of a DICOMweb
    dataset not stored yet is fetched (:func:`segassist.server.dicomweb_images.fetch_image`)."""
    if _ID.fullmatch(ref):
        image = session.get(Image, ref)
        if image is not None and image.dataset_id == dataset.id:
            return image
    if by_name:
        named = session.scalar(
            select(Image)
            .where(Image.dataset_id == dataset.id, Image.name == ref)
            .order_by(Image.created_at.desc(), Image.id.desc())
            .limit(1)
        )
        if named is not None:
            return named
        series = stored_series_image(session, dataset, ref)
        if series is not None:
            return series
        if storage is not None and dataset.dicomweb and _UID.fullmatch(ref):
            return fetch_image(session, storage, dataset, ref)
    raise HTTPException(
        status.HTTP_404_NOT_FOUND,
        f"image {ref!r} not found in dataset {dataset.id!r} (give its id, or the name it was "
        "uploaded under)",
    )


def file_name(image: Image, extension: str = ".nii.gz") -> str:
    """A safe, unique file name for ``image``: its name and the start of its id, ``extension``.

    Unique because viewers cache downloads and results by file name.
    """
    stem = _UNSAFE.sub("_", image.name).strip("._")[:100] or "image"
    return f"{stem}_{image.id[:8]}{extension}"


def class_names(dataset: Dataset | None) -> list[str]:
    """The dataset's class names in value order (background excluded)."""
    if dataset is None:
        return []
    schema = sorted((int(k), v) for k, v in (dataset.labels or {}).items())
    return [str(v.get("name") or f"class {k}") for k, v in schema]


def latest_segmenter(session: Session, dataset: Dataset | None) -> ModelRecord | None:
    """The dataset's newest segmenter."""
    if dataset is None:
        return None
    return session.scalar(
        select(ModelRecord)
        .where(ModelRecord.kind == ModelKind.segmenter, ModelRecord.dataset_id == dataset.id)
        .order_by(ModelRecord.created_at.desc())
        .limit(1)
    )


def serving_segmenter(
    session: Session, storage: Storage, dataset: Dataset | None, image: Image
) -> ModelRecord | None:
    """The segmenter that serves ``image``: the dataset's newest, unless that is a background
    refinement's network (``lineage["refines"]``) with no prediction of ``image``. A refinement
    validated its network only blended with the propagation of the images it refined; any other
    image gets the segmenter of the assist it refined (if still registered)."""
    newest = latest_segmenter(session, dataset)
    if newest is None or (storage.prediction_dir(newest.id, image.id) / "labels.nii.gz").is_file():
        return newest
    refined = newest.lineage.get("refines")
    return (session.get(ModelRecord, refined) if refined else None) or newest


def cluster_count(session: Session, dataset: Dataset | None) -> int:
    """K of the cluster map the ``clusters`` model would return (the latest segmenter's, else
    the newest encoder's of the modality, else the pretraining default)."""
    model = latest_segmenter(session, dataset)
    if model is None and dataset is not None:
        model = session.scalar(
            select(ModelRecord)
            .where(ModelRecord.kind == ModelKind.encoder, ModelRecord.modality == dataset.modality)
            .order_by(ModelRecord.created_at.desc())
            .limit(1)
        )
    if model is not None:
        try:
            return Manifest.load(Path(model.folder) / "manifest.json").num_clusters
        except (OSError, ValueError, KeyError):
            pass
    return int(PretrainConfig().num_clusters)


def _final_counts(session: Session, dataset: Dataset | None) -> tuple[int, dict[str, int]]:
    if dataset is None:
        return 0, {}
    rows = session.execute(
        select(Label.tag, func.count(func.distinct(Label.image_id)))
        .join(Image)
        .where(Image.dataset_id == dataset.id)
        .group_by(Label.tag)
    ).all()
    tags = {str(tag): int(n) for tag, n in rows}
    return tags.get("final", 0), tags


def datastore_status(session: Session, dataset: Dataset | None) -> dict[str, Any]:
    """``{total, completed, label_tags}``: images, images with a final label, images per tag."""
    total = 0
    if dataset is not None:
        total = int(
            session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id)) or 0
        )
    completed, tags = _final_counts(session, dataset)
    return {"total": int(total or 0), "completed": completed, "label_tags": tags}


def _ts(value: Any) -> int:
    return int(value.timestamp()) if value is not None else 0


def image_entry(image: Image) -> dict[str, Any]:
    """What MONAI Label says about an image (``info`` of the datastore, a next sample's body)."""
    return {
        "id": image.id,
        "name": file_name(image),
        "ts": _ts(image.created_at),
        "checksum": f"SHA256:{image.sha256}",
        "path": image.path,
        "shape": list(image.shape),
        "spacing": list(image.spacing),
        "segassist_name": image.name,
        **({"SeriesInstanceUID": image.series_uid} if image.series_uid else {}),
    }


def datastore_json(session: Session, dataset: Dataset | None) -> dict[str, Any]:
    """``GET /datastore/?output=all``: every image and, per tag, its newest label."""
    objects: dict[str, Any] = {}
    if dataset is not None:
        images = session.scalars(
            select(Image).where(Image.dataset_id == dataset.id).order_by(Image.created_at)
        ).all()
        for image in images:
            objects[image.id] = {
                "image": {"ext": ".nii.gz", "info": image_entry(image)},
                "labels": {},
            }
        names = {
            int(k): str(v.get("name", f"class {k}")) for k, v in (dataset.labels or {}).items()
        }
        labels = session.scalars(
            select(Label)
            .join(Image)
            .where(Image.dataset_id == dataset.id)
            .order_by(Label.image_id, Label.version)
        ).all()
        for label in labels:  # ascending versions: the newest of a tag is written last
            label_names = {
                names.get(c, f"class {c}"): int(c) for c in label.classes_present if 0 < c < 255
            }
            objects[label.image_id]["labels"][label.tag] = {
                "ext": ".nii.gz",
                "info": {
                    "ts": _ts(label.created_at),
                    "version": label.version,
                    "label_id": label.id,
                    "checksum": f"SHA256:{label.sha256}",
                    "params": {"label_names": label_names},
                },
            }
    return {
        "name": dataset.name if dataset is not None else DEFAULT_DATASET_NAME,
        "description": "segassist dataset" + (f" {dataset.id}" if dataset is not None else ""),
        "images_dir": "",
        "labels_dir": "",
        "objects": objects,
    }
