"""What annotators use today: 3D Slicer's "fill between slices".

Slicer's Segment Editor effect "Fill between slices" runs ITK's morphological contour
interpolation (Albu et al., "A morphology-based approach for interslice interpolation of
anatomical slices from volumetric images", IEEE TBME 2008; ITK remote module
``MorphologicalContourInterpolation``, PyPI ``itk-morphologicalcontourinterpolation``). Given
contours on some slices, it morphs each contour into the next one along the slice axis. It needs
two labelled slices of a structure to fill anything and never extrapolates past the outermost ones.
"""

from __future__ import annotations

import numpy as np

from segassist.bench.protocol import labelled_mask
from segassist.models.volumes import IGNORE_INDEX, annotated_slices

__all__ = ["fill_between_slices", "warm_up"]


def warm_up() -> None:
    """Import ITK and load the interpolator's modules now (ITK loads them lazily, 10–40 s)."""
    import itk

    itk.MorphologicalContourInterpolator[itk.Image[itk.UC, 3]].New()


def fill_between_slices(sparse: np.ndarray, axis: int) -> np.ndarray:
    """Interpolate a sparse label volume between its annotated slices, class by class.

    Every annotated slice (any voxel ≠ ``IGNORE_INDEX``) is a known slice for every class, so
    an annotated slice without a class stops that class's interpolation, as in Slicer. Annotated
    slices are returned unchanged; where two classes' interpolations overlap the lower id wins.

    Args:
        sparse: ``X×Y×Z`` uint8 labels, ``IGNORE_INDEX`` on unannotated voxels.
        axis: slice axis of the annotation.

    Returns:
        Dense ``uint8`` label volume of the same shape (0 outside every interpolated contour).
    """
    import itk  # slow to import (~10 s): only when the baseline runs

    known = annotated_slices(sparse, axis)
    labels = np.where(sparse == IGNORE_INDEX, 0, sparse).astype(np.uint8)
    out = np.zeros_like(labels)
    itk_axis = sparse.ndim - 1 - axis  # ITK indexes (x, y, z) = numpy axes reversed
    image_type = itk.Image[itk.UC, 3]
    for c in (int(v) for v in np.unique(labels) if v != 0):
        binary = np.ascontiguousarray(labels == c, dtype=np.uint8)
        present = [s for s in known if np.take(binary, s, axis=axis).any()]
        if len(present) < 2:
            out[(binary > 0) & (out == 0)] = c
            continue
        interpolator = itk.MorphologicalContourInterpolator[image_type].New()
        interpolator.SetInput(itk.image_from_array(binary))
        interpolator.SetAxis(itk_axis)
        interpolator.SetUseCustomSlicePositions(True)
        interpolator.SetLabeledSliceIndices(itk_axis, 1, [int(s) for s in known])
        interpolator.SetNumberOfWorkUnits(1)
        interpolator.Update()
        filled = itk.array_from_image(interpolator.GetOutput()) > 0
        out[filled & (out == 0)] = c
    on_known = labelled_mask(sparse.shape, axis, known)
    out[on_known] = labels[on_known]
    return out
