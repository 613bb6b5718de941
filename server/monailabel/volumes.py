"""Volumes in and out of the MONAI Label routes, in 3D Slicer's world (torch-free).

Slicer (and OHIF) place voxels in the patient's LPS world; a NIfTI affine maps voxels to RAS. The
two differ by a sign flip of the first two world axes, so a voxel ``v`` of a stored NIfTI with
affine ``A`` sits in LPS at ``diag(-1, -1, 1) · A · v``. :func:`encode_result` writes a result on
the stored image's grid (same voxel order) with NRRD ``space directions`` and ``space origin``
taken from that flipped affine, or as NIfTI on the stored header; :func:`nrrd_to_nifti` turns an
uploaded NRRD (Slicer's "file extension: .nrrd" setting) into a NIfTI on the same world grid.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np

from segassist.server.ingest import IngestError

__all__ = [
    "NRRD_MAGIC",
    "RAS_TO_LPS",
    "RESULT_DTYPES",
    "RESULT_EXTENSIONS",
    "dicom_modality",
    "encode_result",
    "lps_affine",
    "nrrd_to_nifti",
]

NRRD_MAGIC = b"NRRD000"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""World flip between NIfTI's RAS+ and DICOM/Slicer's LPS+ (its own inverse)."""

RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")

_SPACE_SIGNS = {
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}
"""NRRD ``space`` → signs turning its world axes into RAS."""


def lps_affine(affine: np.ndarray) -> np.ndarray:
    """The voxel → LPS (mm) matrix of a voxel → RAS ``affine`` (4×4)."""
    return RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)


def encode_result(
    data: np.ndarray,
    reference: nib.Nifti1Image,
    extension: str,
    dtype: str,
    compress: bool = True,
) -> bytes:
    """Encode a result volume on ``reference``'s grid as ``extension`` bytes.

    Args:
        data: ``X×Y×Z`` values in ``reference``'s voxel order.
        reference: the stored NIfTI the result belongs to (its affine places the voxels).
        extension: one of :data:`RESULT_EXTENSIONS`.
        dtype: one of :data:`RESULT_DTYPES`.
        compress: gzip the voxel data (NRRD ``encoding: gzip``; ``.nii.gz``).

    Raises:
        ValueError: an unsupported extension or data type, or ``data`` off the reference grid.
    """
    if extension not in RESULT_EXTENSIONS:
        raise ValueError(f"result_extension {extension!r} is not one of {list(RESULT_EXTENSIONS)}")
    if dtype not in RESULT_DTYPES:
        raise ValueError(f"result_dtype {dtype!r} is not one of {list(RESULT_DTYPES)}")
    if tuple(data.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"result of shape {data.shape} is not on the grid {reference.shape[:3]}")
    values = np.asarray(data).astype(dtype)
    if extension == ".nrrd":
        return _nrrd_bytes(values, np.asarray(reference.affine), compress)
    header = reference.header.copy()
    header.set_data_dtype(values.dtype)
    image = nib.Nifti1Image(values, reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1) if extension == ".nii.gz" else raw


def _nrrd_bytes(values: np.ndarray, affine: np.ndarray, compress: bool) -> bytes:
    lps = lps_affine(affine)
    header: dict[str, Any] = {
        "type": values.dtype.name,
        "dimension": 3,
        "space": "left-posterior-superior",
        "sizes": np.asarray(values.shape),
        # One row per voxel axis: the LPS step (mm) from one voxel to the next along it.
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "endian": "little",
        "encoding": "gzip" if compress else "raw",
    }
    buffer = io.BytesIO()
    nrrd.write(buffer, values, header, index_order="F", compression_level=1)
    return buffer.getvalue()


def nrrd_to_nifti(src: Path, dst: Path) -> None:
    """Convert a 3D NRRD (attached header) at ``src`` to a NIfTI at ``dst``, same voxels/world.

    Raises:
        IngestError: not a readable NRRD, not 3D, or no world geometry (``space``).
    """
    try:
        data, header = nrrd.read(str(src), index_order="F")
    except (nrrd.NRRDError, OSError, ValueError) as exc:
        raise IngestError(f"not a readable NRRD file: {exc}") from exc
    field = header.get("space directions")
    rows = [] if field is None else list(field)
    spatial = [
        row is not None and not np.all(np.isnan(np.asarray(row, dtype=float))) for row in rows
    ]
    if data.ndim == 4 and len(spatial) == 4 and spatial.count(False) == 1:
        list_axis = spatial.index(False)  # e.g. a one-layer segmentation's layer axis
        if data.shape[list_axis] == 1:
            data = np.take(data, 0, axis=list_axis)
    if data.ndim != 3:
        raise IngestError(
            f"NRRD holds {data.ndim} dimensions {data.shape}; upload one 3D volume (a "
            "segmentation with several layers, .seg.nrrd, is not supported: export a labelmap)"
        )
    space = str(header.get("space", "")).lower()
    signs = _SPACE_SIGNS.get(space)
    if signs is None or not rows:
        raise IngestError(
            f"NRRD space {space or 'missing'!r} is not one of {sorted(_SPACE_SIGNS)}: the file "
            "must place its voxels in the patient's world"
        )
    directions = np.asarray(
        [row for row, keep in zip(rows, spatial, strict=True) if keep], dtype=float
    )
    if directions.shape != (3, 3):
        raise IngestError(f"NRRD space directions {directions.tolist()} are not 3 vectors of 3")
    world = np.eye(4)
    world[:3, :3] = directions.T
    world[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.diag([*signs, 1.0]) @ world
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        if data.size and (
            data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max
        ):
            raise IngestError("NRRD values do not fit 32-bit integers")
        data = data.astype(np.int32)
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(dst))


def dicom_modality(src: Path) -> str | None:
    """``Modality`` of the first DICOM file in a zip, or ``None`` if none says one."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        with zipfile.ZipFile(src) as archive:
            for info in archive.infolist():
                if info.is_dir() or info.file_size > 64 * 1024 * 1024:
                    continue
                with archive.open(info) as handle:
                    try:
                        dataset = dcmread(handle, stop_before_pixels=True)
                    except (InvalidDicomError, OSError, ValueError):
                        continue
                modality = str(getattr(dataset, "Modality", "") or "").strip()
                if modality:
                    return modality[:32]
    except (zipfile.BadZipFile, OSError):
        return None
    return None
