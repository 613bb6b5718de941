"""PNG montages of a volume with a cluster or label map overlaid (matplotlib, Agg, no pyplot).

Only ``matplotlib.figure.Figure`` and the Agg canvas are used, never pyplot's global state, so
rendering is safe in a server's worker threads and needs no display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from segassist.models.runtime._atomic import atomic_path
from segassist.models.runtime.preprocess import Normalisation, normalise

__all__ = ["montage_slices", "render_cluster_montage", "render_label_montage"]

_DISPLAY_NORM = Normalisation(kind="percentile", low=0.5, high=99.5)
_TILE_INCHES = 2.4
_MAX_COLUMNS = 4


def montage_slices(image: np.ndarray, axis: int, num_slices: int) -> list[int]:
    """Evenly spaced slice indices along ``axis``, within the non-empty part of the volume.

    A slice is empty when the (normalised) image is constant on it, e.g. zero padding or air
    outside the field of view; empty slices at both ends are skipped when any slice is not empty.

    Args:
        image: X×Y×Z volume.
        axis: slicing axis.
        num_slices: how many slices to pick at most.

    Returns:
        Sorted, distinct slice indices.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    other = tuple(a for a in range(3) if a != axis)
    varying = np.flatnonzero(image.max(axis=other) > image.min(axis=other))
    first, last = (
        (int(varying[0]), int(varying[-1])) if varying.size else (0, image.shape[axis] - 1)
    )
    picks = np.rint(np.linspace(first, last, num=min(num_slices, last - first + 1)))
    return sorted({int(p) for p in picks})


def _qualitative(count: int) -> ListedColormap:
    """``count`` colours, index ``k`` always the same: tab20's dark shades, then its light ones."""
    tab20 = colormaps["tab20"]
    base = [tab20(i) for i in range(20)]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return ListedColormap([base[order[k % 20]] for k in range(max(count, 1))])


def _render(
    volume: np.ndarray,
    overlay: np.ndarray,
    axis: int,
    path: str | os.PathLike[str],
    num_slices: int,
    image_norm: Normalisation | None,
    cmap: ListedColormap,
    hide_zero: bool,
    legend: Mapping[int, str] | None,
    alpha: float,
) -> Path:
    if volume.ndim != 3 or volume.shape != overlay.shape:
        raise ValueError(
            f"volume {volume.shape} and overlay {overlay.shape} must be X×Y×Z of the same shape"
        )
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    image = normalise(volume, image_norm or _DISPLAY_NORM)
    indices = montage_slices(image, axis, num_slices)
    columns = min(_MAX_COLUMNS, math.ceil(math.sqrt(len(indices))))
    rows = math.ceil(len(indices) / columns)
    fig = Figure(figsize=(_TILE_INCHES * columns, _TILE_INCHES * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = cmap.N
    for ax, index in zip(axes.flat, indices, strict=False):
        # Slice axes keep the volume's order; show the first across and the second upwards.
        ax.imshow(np.take(image, index, axis).T, cmap="gray", vmin=0, vmax=1, origin="lower")
        labels = np.take(overlay, index, axis).T
        shown = np.ma.masked_equal(labels, 0) if hide_zero else labels
        ax.imshow(
            shown,
            cmap=cmap,
            vmin=-0.5,
            vmax=colours - 0.5,
            alpha=alpha,
            interpolation="nearest",
            origin="lower",
        )
        ax.set_title(f"{'xyz'[axis]} = {index}", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    if legend:
        handles = [
            Patch(color=cmap(k % colours), label=name) for k, name in sorted(legend.items()) if k
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.05 if legend else 0, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def render_cluster_montage(
    volume: np.ndarray,
    clusters: np.ndarray,
    axis: int,
    path: str | os.PathLike[str],
    num_slices: int = 12,
    image_norm: Normalisation | None = None,
    alpha: float = 0.45,
) -> Path:
    """Write a PNG grid of slices with the cluster map overlaid in a qualitative colormap.

    Args:
        volume: X×Y×Z raw intensities.
        clusters: X×Y×Z integer cluster indices (every cluster, 0 included, is coloured).
        axis: slicing axis of the montage.
        path: destination ``.png``, written atomically.
        num_slices: at most this many evenly spaced, non-empty slices.
        image_norm: display window; default: 0.5–99.5 percentiles of the volume.
        alpha: opacity of the overlay.

    Returns:
        ``path``.
    """
    count = int(clusters.max()) + 1 if clusters.size else 1
    return _render(
        volume,
        clusters,
        axis,
        path,
        num_slices,
        image_norm,
        _qualitative(count),
        False,
        None,
        alpha,
    )


def render_label_montage(
    volume: np.ndarray,
    labels: np.ndarray,
    axis: int,
    path: str | os.PathLike[str],
    num_slices: int = 12,
    image_norm: Normalisation | None = None,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, str] | None = None,
    alpha: float = 0.45,
) -> Path:
    """Write a PNG grid of slices with a label map overlaid; background (0) stays transparent.

    Args:
        volume: X×Y×Z raw intensities.
        labels: X×Y×Z integer labels, 0 = background.
        axis: slicing axis of the montage.
        path: destination ``.png``, written atomically.
        num_slices: at most this many evenly spaced, non-empty slices.
        image_norm: display window; default: 0.5–99.5 percentiles of the volume.
        names: label index → name, drawn as a legend.
        colors: label index → matplotlib colour (e.g. the dataset's ``"#e6194b"``); labels
            without one get a qualitative colour.
        alpha: opacity of the overlay.

    Returns:
        ``path``.
    """
    top = int(labels.max()) if labels.size else 0
    count = max([top, *(names or {}), *(colors or {})]) + 1
    cmap = _qualitative(count)
    if colors:
        palette = [colors.get(k, cmap(k)) for k in range(count)]
        cmap = ListedColormap([to_rgba(c) for c in palette])
    return _render(volume, labels, axis, path, num_slices, image_norm, cmap, True, names, alpha)
