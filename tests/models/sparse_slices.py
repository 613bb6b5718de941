"""Shared helpers of the slice-propagation tests: an annotator's sparse labels, a binary Dice."""

from __future__ import annotations

import numpy as np

from segassist.models.runtime.configs import IGNORE_INDEX


def sparse_on(truth: np.ndarray, slices: list[int]) -> np.ndarray:
    """The annotator's labels: ``truth`` on ``slices`` of axis 2, :data:`IGNORE_INDEX` elsewhere."""
    sparse = np.full(truth.shape, IGNORE_INDEX, dtype=np.uint8)
    sparse[:, :, slices] = truth[:, :, slices]
    return sparse


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays."""
    return 2 * float(np.sum(a & b)) / float(np.sum(a) + np.sum(b))
