"""Leave one labelled slice out: the validation the background refinement chooses by.

With ``k ≥ 3`` labelled slices along an axis, the middle one (the ``k // 2``-th in slice order)
is hidden; a method then segments the volume from the other ``k − 1`` and is scored on the hidden
slice by the mean Dice over the classes present in it or in the prediction there,
``2|P_c ∩ T_c| / (|P_c| + |T_c|)`` averaged over those classes ``c``. The middle one because it
has labelled neighbours on both sides, as every slice between the annotator's slices has: the
score measures filling in what nobody labelled, not extrapolating past the last labelled slice.
With fewer than three labelled slices nothing is held out (:func:`hold_out_middle_slice` returns
None): hiding one of two leaves a one-slice problem, a different one from the annotator's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.volumes import annotated_slices

__all__ = ["MIN_LABELLED_SLICES", "HeldOutSlice", "hold_out_middle_slice"]

MIN_LABELLED_SLICES = 3
"""Labelled slices an image needs before one of them is held out."""


@dataclass(frozen=True)
class HeldOutSlice:
    """One labelled slice hidden from a sparse label volume.

    Attributes:
        axis: the slice axis.
        index: the hidden slice's position along ``axis``.
        labels: ``X×Y×Z`` sparse labels without that slice (``IGNORE_INDEX`` there).
        truth: the hidden slice's labels as drawn (2-D, ``IGNORE_INDEX`` where undrawn).
    """

    axis: int
    index: int
    labels: np.ndarray
    truth: np.ndarray

    def dice(self, predicted: np.ndarray) -> float:
        """Mean Dice of an ``X×Y×Z`` label volume on the hidden slice's drawn voxels (module
        doc), 0 … 1."""
        drawn = self.truth != IGNORE_INDEX
        truth = self.truth[drawn]
        guess = np.take(np.asarray(predicted), self.index, axis=self.axis)[drawn]
        scores = []
        for c in np.union1d(np.unique(truth), np.unique(guess)):
            t, p = truth == c, guess == c
            scores.append(2.0 * float(np.sum(t & p)) / float(np.sum(t) + np.sum(p)))
        return float(np.mean(scores))


def hold_out_middle_slice(sparse: np.ndarray, axis: int) -> HeldOutSlice | None:
    """Hide the middle labelled slice of ``sparse`` (``X×Y×Z``, ``IGNORE_INDEX`` = unlabelled)
    along ``axis``; None with fewer than :data:`MIN_LABELLED_SLICES` labelled slices. The input
    is not modified."""
    labelled = annotated_slices(sparse, axis)
    if len(labelled) < MIN_LABELLED_SLICES:
        return None
    index = labelled[len(labelled) // 2]
    reduced = np.array(sparse, copy=True)
    truth = np.take(reduced, index, axis=axis).copy()
    np.moveaxis(reduced, axis, 0)[index] = IGNORE_INDEX
    return HeldOutSlice(axis, index, reduced, truth)
