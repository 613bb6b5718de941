"""NIfTI volumes, their 2D slices, and sparse label volumes.

Volumes are numpy arrays ``X×Y×Z`` in the NIfTI's own voxel order: nothing here reorients, so
the affine returned by :func:`load_volume` is the file's and stays valid for every array derived
from the volume. Label volumes are ``uint8``; :data:`IGNORE_INDEX` marks unannotated voxels.

This module imports numpy, nibabel and pydantic only (no torch), so the API process may use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np

from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.nifti import open_nifti

__all__ = [
    "IGNORE_INDEX",
    "SparseLabels",
    "annotated_slices",
    "class_argmax",
    "iter_slices",
    "load_volume",
    "stack_slices",
]


def _check_axis(volume: np.ndarray, axis: int, what: str = "volume") -> int:
    if volume.ndim != 3:
        raise ValueError(f"{what} must be 3D (X×Y×Z), got shape {volume.shape}")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    return axis % 3


def load_volume(path: str | PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as float32 in its own voxel order (no reorientation).

    A 4D file with a single volume (``X×Y×Z×1``) is accepted and squeezed.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(volume, affine)``: float32 ``X×Y×Z`` array (scaling slope/intercept applied) and the
        file's 4×4 voxel-to-world affine (float64).

    Raises:
        ValueError: if the image is not 3D.
    """
    image = open_nifti(path)
    shape = image.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape}")
    data = image.get_fdata(dtype=np.float32).reshape(shape[:3])
    affine = np.asarray(image.affine, dtype=np.float64)
    return np.ascontiguousarray(data, dtype=np.float32), affine


def iter_slices(volume: np.ndarray, axis: int) -> Iterator[np.ndarray]:
    """Yield the 2D slices of a ``X×Y×Z`` volume along ``axis`` (views, in index order).

    Slice ``i`` is ``np.take(volume, i, axis)``; its two axes keep the volume's order.
    """
    axis = _check_axis(volume, axis)
    yield from np.moveaxis(volume, axis, 0)


def stack_slices(slices: Sequence[np.ndarray] | np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`iter_slices`: stack 2D slices (``S×H×W`` or a sequence) into a volume.

    Raises:
        ValueError: if the slices are not 2D or differ in shape.
    """
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    arrays = [np.asarray(s) for s in slices]
    if not arrays:
        raise ValueError("no slices to stack")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"slices must be 2D and of one shape, got shapes {sorted(shapes)}")
    return np.stack(arrays, axis=axis % 3)


def annotated_slices(labels: np.ndarray, axis: int) -> list[int]:
    """Indices of the slices along ``axis`` with at least one voxel ≠ :data:`IGNORE_INDEX`."""
    axis = _check_axis(labels, axis, "label volume")
    other = tuple(a for a in range(3) if a != axis)
    annotated = np.any(labels != IGNORE_INDEX, axis=other)
    return [int(i) for i in np.flatnonzero(annotated)]


def class_argmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """``scores.argmax(axis)`` as ``uint8``, the first class winning ties (a loop over the ``L``
    classes is 5× faster than numpy's argmax along a class axis that is not the last: 0.09 s
    against 0.5 s for ``100×3×256×256``)."""
    classes = np.moveaxis(scores, axis, 0)
    best = classes[0].copy()
    labels = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, classes.shape[0]):
        better = classes[c] > best
        labels[better] = c
        np.maximum(best, classes[c], out=best)
    return labels


@dataclass(frozen=True)
class SparseLabels:
    """A label volume where only some voxels (typically some slices) are annotated.

    Attributes:
        labels: ``X×Y×Z`` integer array; class ids ``0…L−1`` (0 = background) and
            :data:`IGNORE_INDEX` for unannotated voxels.
    """

    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.labels.ndim != 3:
            raise ValueError(f"label volume must be 3D (X×Y×Z), got shape {self.labels.shape}")
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"label volume must hold integers, got dtype {self.labels.dtype}")

    def annotated_slices(self, axis: int) -> list[int]:
        """Slices along ``axis`` with any annotated voxel (see :func:`annotated_slices`)."""
        return annotated_slices(self.labels, axis)

    def classes_present(self) -> list[int]:
        """Sorted class ids that occur among the annotated voxels."""
        values = np.unique(self.labels)
        return [int(v) for v in values if v != IGNORE_INDEX]

    def check(self, num_classes: int, shape: tuple[int, ...] | None = None) -> None:
        """Validate against a label schema (and optionally the image's shape).

        Raises:
            ValueError: if a class id is negative or ``≥ num_classes`` (other than the ignore
                value), or the shape differs from ``shape``.
        """
        if shape is not None and tuple(self.labels.shape) != tuple(shape):
            raise ValueError(
                f"label volume shape {self.labels.shape} differs from image shape {tuple(shape)}"
            )
        bad = [c for c in self.classes_present() if not 0 <= c < num_classes]
        if bad:
            raise ValueError(
                f"label values {bad} out of range for {num_classes} classes "
                f"(expected 0…{num_classes - 1} or {IGNORE_INDEX} for unannotated)"
            )
