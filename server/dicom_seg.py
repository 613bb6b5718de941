"""Label volumes of DICOM-sourced images as DICOM Segmentation objects (highdicom), and back.

Voxel order: an image that came from DICOM is stored as :mod:`segassist.server.dicom` lays it out; its
label volumes become the series' own ``Z×rows×columns`` frames (:mod:`segassist.server.series_order`),
frame ``k`` on source instance ``k`` of :mod:`segassist.server.dicom_headers`.

Segments: one per class of the dataset's schema (value ``v`` ≥ 1), numbered 1…N in value order
(DICOM wants consecutive segment numbers); the segment label is the class name, the tracking id
``class <v>`` keeps the value, the display colour is the schema's. Where pydicom's SNOMED CT
dictionary knows the name (``liver`` → SCT 10200004 "Liver") the segment is coded as that
anatomical structure; other names get a code of the local scheme ``99SEGASSIST`` under the
category "Tissue". Unannotated voxels (255) of a sparse label become background.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.server.series_order import frames_from_volume, volume_from_frames

__all__ = [
    "LOCAL_SCHEME",
    "SegmentClass",
    "build_segmentation",
    "labels_from_segmentation",
]

LOCAL_SCHEME = "99SEGASSIST"
"""Coding scheme of classes SNOMED CT does not name (a private scheme: ``99`` prefix)."""
_WORDS = re.compile(r"[A-Za-z0-9]+")
_TRACKING = re.compile(r"^class (\d+)$")


@dataclass(frozen=True)
class SegmentClass:
    """One class of the label schema.

    Attributes:
        value: the label value (1…254).
        name: the class name.
        color: ``#rrggbb`` display colour.
    """

    value: int
    name: str
    color: str = "#ff0000"


def _property_type(name: str, value: int) -> tuple[Code, hd.sr.CodedConcept | Code]:
    """(category, type) of a class: SNOMED CT anatomy when pydicom knows the name."""
    keyword = "".join(word.capitalize() for word in _WORDS.findall(name))
    known = getattr(codes.SCT, keyword, None) if keyword else None
    if isinstance(known, Code):
        return codes.SCT.AnatomicalStructure, known
    local = hd.sr.CodedConcept(value=str(value), scheme_designator=LOCAL_SCHEME, meaning=name[:64])
    return codes.SCT.Tissue, local


def _rgb(color: str) -> tuple[int, int, int]:
    digits = color.lstrip("#")
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def _version() -> str:
    try:
        return metadata.version("segassist")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_segmentation(
    labels: np.ndarray,
    instances: list[Dataset],
    classes: list[SegmentClass],
    *,
    automatic: bool,
    description: str,
    series_number: int = 900,
) -> hd.seg.Segmentation:
    """A DICOM-SEG of ``labels`` referencing the series ``instances``.

    Args:
        labels: ``X×Y×Z`` uint8 label volume in the stored layout (255 = unannotated).
        instances: the source series' headers in stacking order (``len == Z``).
        classes: the label schema; values in ``labels`` outside it become background.
        automatic: ``AUTOMATIC`` segments (a prediction) or ``MANUAL`` ones (an annotation).
        description: SeriesDescription and ContentDescription of the SEG.
        series_number: SeriesNumber of the new series.

    Raises:
        ValueError: ``labels`` does not match the series (slices, rows, columns) or the schema
            is empty.
    """
    if labels.ndim != 3 or labels.shape[2] != len(instances):
        raise ValueError(
            f"label volume {labels.shape} does not match the {len(instances)} source images"
        )
    if not classes:
        raise ValueError("the label schema has no class: nothing to put in a DICOM-SEG")
    rows, columns = int(instances[0].Rows), int(instances[0].Columns)
    if labels.shape[:2] != (columns, rows):
        raise ValueError(
            f"label volume {labels.shape} is not on the {rows}×{columns} grid of the series"
        )
    ordered = sorted(classes, key=lambda c: c.value)
    lookup = np.zeros(256, dtype=np.uint8)
    for number, segment in enumerate(ordered, start=1):
        lookup[segment.value] = number
    lookup[IGNORE_INDEX] = 0
    frames = lookup[frames_from_volume(np.asarray(labels, dtype=np.uint8))]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="segassist",
        family=codes.cid7162.ArtificialIntelligence,
        version=_version(),
    )
    descriptions = []
    for number, segment in enumerate(ordered, start=1):
        category, kind = _property_type(segment.name, segment.value)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type="AUTOMATIC" if automatic else "MANUAL",
                algorithm_identification=algorithm if automatic else None,
                tracking_uid=hd.UID(),
                tracking_id=f"class {segment.value}",
                display_color=hd.color.CIELabColor.from_rgb(*_rgb(segment.color)),
            )
        )
    segmentation = hd.seg.Segmentation(
        source_images=instances,
        pixel_array=frames,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="segassist",
        manufacturer_model_name="segassist",
        software_versions=_version(),
        device_serial_number="1",
        content_description=description[:64],
        content_label="SEGASSIST",
    )
    segmentation.SeriesDescription = description[:64]
    return segmentation


def labels_from_segmentation(
    segmentation: hd.seg.Segmentation, instances: list[Dataset]
) -> np.ndarray:
    """The ``X×Y×Z`` label volume (class values) a SEG made by :func:`build_segmentation` holds.

    Args:
        segmentation: read with ``highdicom.seg.segread``.
        instances: the source series' headers in stacking order.
    """
    values = np.zeros(len(segmentation.SegmentSequence) + 1, dtype=np.uint8)
    for item in segmentation.SegmentSequence:
        match = _TRACKING.match(str(getattr(item, "TrackingID", "")))
        if match is None:
            raise ValueError(f"segment {item.SegmentNumber} carries no 'class <value>' tracking id")
        values[int(item.SegmentNumber)] = int(match.group(1))
    numbers = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in instances],
        combine_segments=True,
        dtype=np.uint8,
    )
    return volume_from_frames(values[numbers])
