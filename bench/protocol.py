"""The few-shot benchmark protocol: which slices are labelled, what is scored, how volumes split.

DESIGN.md, "Benchmark protocol": in slice propagation an annotator labels ``k`` slices of one
volume, spread over the structure's extent, and the rest is predicted; Dice per class is computed
on the *unlabelled* slices only. In cross-volume, ``k`` whole volumes are labelled and the others
predicted.

Choices (the design is silent):

- The extent is the set of slices holding any foreground class (union over classes), so one slice
  can show every structure, as an annotator would choose it.
- The ``k`` slices sit at the quantile mid-points ``(i + ½)/k`` of that extent (``k = 1``: the
  median foreground slice; ``k = 3``: ⅙, ½, ⅚). Each labelled slice stands for an equal share of the
  structure; the structure's tips stay unlabelled, as they are the slices an annotator skips.
- Dice is computed over every unlabelled slice (also those outside the extent, where a false
  positive costs), per class. A class absent from both truth and prediction in the scored region
  gives NaN (no evidence either way) and is left out of means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segassist.models.volumes import IGNORE_INDEX

__all__ = [
    "cross_volume_splits",
    "dice_per_class",
    "foreground_slices",
    "labelled_mask",
    "mean_dice",
    "slice_propagation_dice",
    "sparse_labels",
    "spread_slices",
]


def foreground_slices(label: np.ndarray, axis: int) -> np.ndarray:
    """Sorted indices of the slices along ``axis`` with any voxel of class > 0."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    return np.flatnonzero(np.any(label > 0, axis=other))


def spread_slices(label: np.ndarray, axis: int, k: int) -> list[int]:
    """``k`` distinct slices spread over the foreground extent, at its quantile mid-points.

    Args:
        label: full ground-truth label volume ``X×Y×Z`` (0 = background).
        axis: slice axis.
        k: number of slices to label, ``1 ≤ k ≤`` number of foreground slices.

    Returns:
        Sorted slice indices.

    Raises:
        ValueError: if ``k`` is not in that range.
    """
    present = foreground_slices(label, axis)
    if not 1 <= k <= present.size:
        raise ValueError(f"cannot spread {k} slices over {present.size} foreground slices")
    positions = np.round((np.arange(k) + 0.5) / k * (present.size - 1)).astype(int)
    return sorted(int(present[p]) for p in np.unique(positions))


def labelled_mask(shape: Sequence[int], axis: int, slices: Sequence[int]) -> np.ndarray:
    """Boolean volume, True on the labelled ``slices`` along ``axis``."""
    index = np.zeros(shape[axis], dtype=bool)
    index[list(slices)] = True
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(index.reshape(view), tuple(shape))


def sparse_labels(label: np.ndarray, axis: int, slices: Sequence[int]) -> np.ndarray:
    """The annotator's sparse label volume: ``label`` on ``slices``, ``IGNORE_INDEX`` elsewhere."""
    out = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
    keep = labelled_mask(label.shape, axis, slices)
    out[keep] = label[keep]
    return out


def dice_per_class(
    prediction: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[int],
    region: np.ndarray | None = None,
) -> dict[int, float]:
    """Dice ``2|P∩T| / (|P| + |T|)`` per class, over ``region`` (all voxels if None).

    Returns NaN for a class absent from both prediction and truth in the region.

    Raises:
        ValueError: if the shapes differ.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth {truth.shape}")
    if region is not None:
        prediction, truth = prediction[region], truth[region]
    scores: dict[int, float] = {}
    for c in classes:
        p, t = prediction == c, truth == c
        total = int(p.sum()) + int(t.sum())
        scores[int(c)] = float("nan") if total == 0 else 2.0 * float((p & t).sum()) / total
    return scores


def mean_dice(scores: Mapping[Any, float]) -> float:
    """Mean over the classes with a defined Dice (NaN if none)."""
    values = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def slice_propagation_dice(
    prediction: np.ndarray,
    truth: np.ndarray,
    axis: int,
    labelled: Sequence[int],
    classes: Sequence[int],
) -> dict[int, float]:
    """Dice per class on the slices the annotator did *not* label."""
    region = ~labelled_mask(truth.shape, axis, labelled)
    return dice_per_class(prediction, truth, classes, region)


def cross_volume_splits(num_volumes: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    """Label ``k`` of ``num_volumes`` volumes (drawn under ``seed``), predict the others.

    Returns:
        ``(labelled, held_out)`` volume indices, each sorted.

    Raises:
        ValueError: unless ``1 ≤ k < num_volumes``.
    """
    if not 1 <= k < num_volumes:
        raise ValueError(f"need 1 ≤ k < volumes, got k={k} with {num_volumes} volumes")
    order = np.random.default_rng(seed).permutation(num_volumes)
    return sorted(int(i) for i in order[:k]), sorted(int(i) for i in order[k:])
