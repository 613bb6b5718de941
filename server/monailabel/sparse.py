"""Label volumes saved by a viewer → segassist's sparse labels (numpy only).

3D Slicer saves a full label volume in which every voxel nobody painted is 0: it cannot say
"unannotated". segassist needs that distinction (255 = unannotated), so a viewer's label is
read with one rule, along the **annotation axis** (the image's slice axis: the axis of largest
voxel spacing, the last one on ties; ``params.axis`` overrides):

- a slice holding any voxel of a class (1…254) is annotated: its 0 voxels are background;
- a slice holding none is unannotated: all its voxels become 255.

A volume that already holds 255 anywhere follows segassist's own convention and is stored as
sent (so an all-background slice can be marked annotated by sending 255 elsewhere). The
``annotated_slices`` parameter names the annotated slices explicitly (or ``"all"``: a full
annotation, zeros included).

Viewers number their segments 1…n in the order of the segment list; ``label_info``
(``[{"name", "idx"}]``) names them. :func:`map_segments` turns those numbers into the dataset's
class values by name, adding classes the schema does not have yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.server.db.tables import default_schema

__all__ = ["AnnotatedSlices", "annotation_axis", "map_segments", "sparse_from_viewer"]

AnnotatedSlices = Sequence[int] | Literal["all"] | None
"""Slices the client says are annotated; ``None`` = the rule above."""


def annotation_axis(spacing: Sequence[float], painted: np.ndarray | None = None) -> int:
    """The axis the annotator painted along: of the axes along which the painted (non-zero)
    voxels occupy some but not all slices, the one with the fewest such slices; otherwise (or
    without ``painted``) the image's slice axis, the axis of largest voxel spacing (the last one
    on ties)."""
    values = [float(s) for s in spacing[:3]]
    if painted is not None and painted.ndim == 3:
        mask = painted != 0
        counts = {
            a: int(mask.any(axis=tuple(b for b in range(3) if b != a)).sum()) for a in range(3)
        }
        partial = {a: n for a, n in counts.items() if 0 < n < mask.shape[a]}
        if partial:
            return min(partial, key=lambda a: (partial[a], -a))
    return max(range(3), key=lambda a: (values[a], a))


def sparse_from_viewer(
    label: np.ndarray, axis: int, annotated: AnnotatedSlices = None
) -> tuple[np.ndarray, list[int]]:
    """Apply the module's rule to a ``uint8`` ``X×Y×Z`` label.

    Returns:
        The sparse label (a new array) and the annotated slice indices along ``axis``.

    Raises:
        ValueError: ``axis`` or a slice index out of range.
    """
    if label.ndim != 3 or not 0 <= axis < 3:
        raise ValueError(f"axis {axis} of a label of shape {label.shape}")
    out = np.array(label, dtype=np.uint8, copy=True)
    slices = np.moveaxis(out, axis, 0)  # a view: writes land in ``out``
    count = slices.shape[0]
    if annotated == "all":
        return out, list(range(count))
    if annotated is not None:
        chosen = sorted({int(i) for i in annotated})
        bad = [i for i in chosen if not 0 <= i < count]
        if bad:
            raise ValueError(
                f"annotated_slices {bad} outside 0…{count - 1} (axis {axis} has {count} slices)"
            )
        keep = np.zeros(count, dtype=bool)
        keep[chosen] = True
        slices[~keep] = IGNORE_INDEX
        return out, chosen
    flat = slices.reshape(count, -1)
    if (flat == IGNORE_INDEX).any():
        kept = np.flatnonzero((flat != IGNORE_INDEX).any(axis=1))
        return out, [int(i) for i in kept]
    painted = (flat > 0).any(axis=1)
    slices[~painted] = IGNORE_INDEX
    return out, [int(i) for i in np.flatnonzero(painted)]


def map_segments(
    label: np.ndarray, label_info: Any, schema: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Renumber a viewer's segments into the dataset's classes by name.

    Args:
        label: ``uint8`` label whose values are the viewer's segment numbers (``idx``).
        label_info: ``[{"name": str, "idx": int}, …]`` as Slicer sends it (``None`` or empty:
            values are taken as class values already).
        schema: the dataset's label schema (``{"1": {"name", "color"}}``).

    Returns:
        The renumbered label and the schema, extended by classes named for the first time
        (``background`` is 0; 255 is left alone).

    Raises:
        ValueError: ``label_info`` is malformed, or the schema has no room for another class.
    """
    if not label_info:
        return label, schema
    if not isinstance(label_info, list):
        raise ValueError("params.label_info must be a list of {name, idx}")
    schema = {key: dict(value) for key, value in schema.items()}
    by_name = {str(v.get("name", "")).casefold(): int(k) for k, v in schema.items()}
    table = np.arange(256, dtype=np.uint8)
    seen: set[int] = set()
    for entry in label_info:
        if not isinstance(entry, dict):
            raise ValueError(f"params.label_info entry {entry!r} is not {{name, idx}}")
        name, idx = str(entry.get("name", "")).strip(), entry.get("idx")
        if not name or not isinstance(idx, int) or isinstance(idx, bool):
            raise ValueError(f"params.label_info entry {entry!r} needs a name and an integer idx")
        if not 1 <= idx < IGNORE_INDEX or idx in seen:
            raise ValueError(
                f"params.label_info idx {idx} must be unique and within 1…{IGNORE_INDEX - 1}"
            )
        seen.add(idx)
        if name.casefold() == "background":
            table[idx] = 0
            continue
        value = by_name.get(name.casefold())
        if value is None:
            value = next((v for v in range(1, IGNORE_INDEX) if str(v) not in schema), None)
            if value is None:
                raise ValueError(f"the dataset has no free class value left for {name!r}")
            schema[str(value)] = {
                "name": name[:128],
                "color": default_schema([value])[str(value)]["color"],
            }
            by_name[name.casefold()] = value
        table[idx] = value
    return table[label], schema
