"""NIfTI reading and atomic writing that keep the reference geometry bit for bit.

Every volume segassist returns lives on its input's grid: same voxel order, same affine, same
qform/sform and their codes. :func:`write_nifti_atomic` therefore copies the reference header
instead of rebuilding one from an affine (which would reset the codes and re-derive the qform).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import DTypeLike

from segassist.models.runtime._atomic import atomic_path

__all__ = ["open_nifti", "read_nifti", "write_nifti_atomic"]

Reference = nib.Nifti1Image | tuple[np.ndarray, nib.Nifti1Header]


def open_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Open a NIfTI-1 or NIfTI-2 file lazily: header and affine read, voxels left on disk
    (``image.dataobj`` reads them on demand). The one place segassist calls ``nib.load``.

    Raises:
        ValueError: if nibabel reads the file as something other than NIfTI.
    """
    image = nib.load(os.fspath(path))
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise ValueError(f"{path} is not a NIfTI image (nibabel read it as {type(image).__name__})")
    return image


def read_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI-1 file (``.nii`` or ``.nii.gz``; NIfTI-2 is converted to a NIfTI-1 header).

    Args:
        path: the file.

    Returns:
        ``(array, affine, header)``: the data with scaling applied, in the file's voxel order
        (X×Y×Z[×…], float for scaled or float data, the stored integer type otherwise), the
        4×4 ``float64`` affine, and a copy of the header.
    """
    image = open_nifti(path)
    header = image.header
    if isinstance(image, nib.Nifti2Image):
        header = nib.Nifti1Header.from_header(header)
    array = np.asanyarray(image.dataobj)
    return np.asarray(array), np.array(image.affine, dtype=np.float64), header.copy()


def _reference_parts(like: Reference) -> tuple[np.ndarray, nib.Nifti1Header]:
    if isinstance(like, nib.Nifti1Image):
        return np.asarray(like.affine), like.header
    if isinstance(like, tuple) and len(like) == 2:
        affine, header = like
        return np.asarray(affine), header
    raise ValueError(
        f"reference must be a Nifti1Image or an (affine, header) pair, got {type(like).__name__}"
    )


def _checked_cast(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    if not np.issubdtype(dtype, np.integer) or array.size == 0:
        return array.astype(dtype, copy=False)
    if not np.issubdtype(array.dtype, np.integer) and not (
        np.all(np.isfinite(array)) and np.array_equal(array, np.round(array))
    ):
        raise ValueError(f"cannot store non-integer values as {dtype}")
    info = np.iinfo(dtype)
    if array.min() < info.min or array.max() > info.max:
        raise ValueError(
            f"values in [{array.min()}, {array.max()}] do not fit {dtype} [{info.min}, {info.max}]"
        )
    return array.astype(dtype, copy=False)


def write_nifti_atomic(
    array: np.ndarray,
    path: str | os.PathLike[str],
    like: Reference,
    dtype: DTypeLike,
) -> Path:
    """Write ``array`` on the grid of a reference image, atomically.

    The reference header is copied (affine, qform, sform and their codes, units, pixdim), the
    data type is set to ``dtype`` and scaling is disabled, so the stored voxels are exactly
    ``array.astype(dtype)``: no slope/intercept from the reference (e.g. a CT's
    ``scl_inter = -1024``) leaks into a label map.

    Args:
        array: X×Y×Z (or X×Y×Z×…) data whose first three axes match the reference's shape.
        path: destination, ``.nii`` or ``.nii.gz``; written to a temporary sibling then renamed.
        like: the reference image, or its ``(affine, header)`` as returned by :func:`read_nifti`.
        dtype: on-disk data type, e.g. ``np.uint8`` for labels, ``np.float32`` for probabilities.

    Returns:
        The destination path.

    Raises:
        ValueError: if the spatial shape differs from the reference, the values do not fit
            ``dtype``, or the affine disagrees with the reference header.
    """
    dest = Path(path)
    if not dest.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI path must end with .nii or .nii.gz, got {dest.name!r}")
    affine, ref_header = _reference_parts(like)
    data = np.asarray(array)
    ref_shape = tuple(ref_header.get_data_shape())[:3]
    if data.ndim < 3 or data.shape[:3] != ref_shape:
        raise ValueError(
            f"array shape {data.shape} does not start with the reference's spatial shape {ref_shape}"
        )
    header = nib.Nifti1Header.from_header(ref_header)
    if not np.array_equal(header.get_best_affine(), affine):
        raise ValueError("reference affine differs from the affine stored in its header")
    target = np.dtype(dtype)
    data = _checked_cast(data, target)
    header.set_data_dtype(target)
    header.set_data_shape(data.shape)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(data, affine=None, header=header)
    with atomic_path(dest) as tmp:
        nib.save(image, os.fspath(tmp))
    return dest
