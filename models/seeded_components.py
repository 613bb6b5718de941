"""Remove predicted objects the annotator's slices do not reach (3D connected components).

A probe head reads local features, so it also fires on look-alike tissue far from the structure:
muscle or heart taken for liver on slices beyond the organ, the wrong kidney, a second "lesion".
The annotator's own slices say where the structure is. Per class ``c``:

- *seeds*: the voxels the annotator drew as ``c``;
- *objects*: the 3D connected components (26-connectivity) of the predicted ``c`` voxels; every
  seed lies in one, since a prediction returns labelled voxels as drawn;
- if the seeds lie in **one** object, the other objects of ``c`` are removed (set to background):
  the annotator's slices show one connected structure, and nothing joins the rest to it;
- if they lie in **several**, the labelled slices themselves show ``c`` as separate objects
  (vertebrae, lobes, several lesions), so unlabelled objects may be real: all are kept;
- a class with no seed (never drawn) is kept as predicted: there is no evidence either way.

Measured on the probe rows of the benchmark (MLP head fused with the slice prior, 4 sets,
``bench/results/slice_prior/fewshot.md``; see the README). Removing every unseeded object
unconditionally cost spine CT up to 0.08 Dice (the vertebrae of one class are separate objects);
the "several objects" rule keeps those whenever two labelled slices show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from segassist.models.runtime.configs import IGNORE_INDEX

__all__ = ["ComponentFilter", "keep_seeded_components"]

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass
class ComponentFilter:
    """What :func:`keep_seeded_components` did.

    Attributes:
        removed: class index → number of predicted objects removed.
        removed_voxels: voxels set to background, all classes.
        several_objects: classes whose seeds lie in several objects (nothing removed).
    """

    removed: dict[int, int] = field(default_factory=dict)
    removed_voxels: int = 0
    several_objects: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed_objects": {str(c): n for c, n in self.removed.items()},
            "removed_voxels": self.removed_voxels,
            "several_objects": self.several_objects,
        }


def keep_seeded_components(
    labels: np.ndarray, sparse: np.ndarray
) -> tuple[np.ndarray, np.ndarray, ComponentFilter]:
    """Keep, per class, only the predicted object holding the annotator's voxels of that class.

    Args:
        labels: ``X×Y×Z`` predicted labels (0 = background), labelled voxels as drawn.
        sparse: ``X×Y×Z`` annotator's labels (:data:`IGNORE_INDEX` = unannotated).

    Returns:
        ``(labels, removed, report)``: the filtered labels (a new array), the boolean mask of the
        voxels set to background, and what was done.

    Raises:
        ValueError: if the shapes disagree.
    """
    if labels.shape != sparse.shape:
        raise ValueError(f"labels {labels.shape} do not match the sparse labels {sparse.shape}")
    report = ComponentFilter()
    removed = np.zeros(labels.shape, dtype=bool)
    drawn = sparse != IGNORE_INDEX
    for c in (int(v) for v in np.unique(labels) if v != 0):
        seeds = drawn & (sparse == c)
        if not seeds.any():
            continue
        objects, count = ndimage.label(labels == c, structure=_CONNECTIVITY)
        seeded = np.unique(objects[seeds])
        seeded = seeded[seeded > 0]
        if seeded.size > 1:
            report.several_objects.append(c)
            continue
        if seeded.size == 0 or count == 1:
            continue
        outside = (objects > 0) & (objects != seeded[0])
        removed |= outside
        report.removed[c] = count - 1
    report.removed_voxels = int(removed.sum())
    filtered = labels.copy()
    filtered[removed] = 0
    return filtered, removed, report
