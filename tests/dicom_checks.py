"""Geometry checks of label volumes between a NIfTI grid and a DICOM series or DICOM-SEG.

Each maps voxel centres through world coordinates (DICOM's LPS, NIfTI's RAS+), so it checks a
voxel order without relying on the layout code under test.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["assert_same_world_labels", "series_frames_from_nifti"]

_RAS_TO_LPS = np.array([[-1.0], [-1.0], [1.0]])


def _nifti_values(labels: np.ndarray, affine: np.ndarray, lps: np.ndarray) -> np.ndarray:
    """Values of ``labels`` (voxel → RAS ``affine``) at the LPS points ``lps`` (3×N)."""
    index = np.linalg.solve(affine[:3, :3], lps * _RAS_TO_LPS - affine[:3, 3:4])
    rounded = np.rint(index).astype(int)
    assert np.abs(index - rounded).max() < 1e-2, "points are off the NIfTI voxel centres"
    return labels[rounded[0], rounded[1], rounded[2]]


def assert_same_world_labels(
    nifti_labels: np.ndarray, nifti_affine: np.ndarray, seg: np.ndarray, seg_affine: np.ndarray
) -> None:
    """Every voxel of a volume with LPS ``seg_affine`` (highdicom) holds the NIfTI's value there."""
    grid = np.indices(seg.shape).reshape(3, -1)
    lps = seg_affine[:3, :3] @ grid + seg_affine[:3, 3:4]
    values = _nifti_values(nifti_labels, nifti_affine, lps)
    np.testing.assert_array_equal(seg.reshape(-1), values)


def series_frames_from_nifti(
    labels: np.ndarray, affine: np.ndarray, instances: list[Dataset]
) -> np.ndarray:
    """``Z×rows×columns``: for each instance, sorted along its slice normal as a viewer stacks
    the series, the NIfTI value at each pixel's centre (PS3.3 C.7.6.2.1.1)."""
    orientation = np.asarray(instances[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    ordered = sorted(instances, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    rows, columns = int(ordered[0].Rows), int(ordered[0].Columns)
    spacing_rows, spacing_columns = (float(v) for v in ordered[0].PixelSpacing)
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    frames = []
    for instance in ordered:
        origin = np.asarray(instance.ImagePositionPatient, dtype=float)[:, None]
        lps = (
            origin
            + row_dir[:, None] * (c.reshape(1, -1) * spacing_columns)
            + col_dir[:, None] * (r.reshape(1, -1) * spacing_rows)
        )
        frames.append(_nifti_values(labels, affine, lps).reshape(rows, columns))
    return np.stack(frames)
