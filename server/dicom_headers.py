"""The source series' DICOM headers kept next to an image that came from DICOM.

A DICOM-SEG must reference the images it segments (UIDs, patient and study, and per instance
the geometry highdicom checks: ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows,
Columns, FrameOfReferenceUID). The stored NIfTI keeps none of that, so ingest writes the headers of
every instance, in stacking order (slice ``k`` of the NIfTI is instance ``k``), without pixel data
or private tags, as a DICOM JSON array (PS3.18 F.2) beside the image::

    images/<image_id>/image.nii.gz
    images/<image_id>/dicom.json
"""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.dataset import Dataset

from segassist.server.storage import atomic_write_bytes

__all__ = ["HEADERS_NAME", "headers_path", "read_headers", "write_headers"]

HEADERS_NAME = "dicom.json"
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
"""Value representations not kept: pixel data, overlays, icons, embedded files."""


def headers_path(image_path: Path) -> Path:
    """Where the headers of the image stored at ``image_path`` live."""
    return image_path.with_name(HEADERS_NAME)


def _header(dataset: Dataset) -> dict[str, object]:
    kept = Dataset()
    for element in dataset:
        if not element.tag.is_private and element.VR not in _BINARY_VRS:
            kept.add(element)
    return kept.to_json_dict()


def write_headers(instances: list[Dataset], dst: Path) -> None:
    """Write the headers of ``instances`` (stacking order) to ``dst`` atomically."""
    payload = json.dumps([_header(dataset) for dataset in instances], separators=(",", ":"))
    atomic_write_bytes(payload.encode(), dst)


def read_headers(src: Path) -> list[Dataset]:
    """The headers written by :func:`write_headers`, as pydicom datasets in stacking order."""
    return [Dataset.from_json(item) for item in json.loads(src.read_text())]
