"""Cluster and label montages: readable PNGs of evenly spaced, non-empty slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from segassist.models.runtime.render import (
    montage_slices,
    render_cluster_montage,
    render_label_montage,
)


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """40×48×30 volume, empty (constant) outside z ∈ [5, 24], with a sphere and a 6-cluster map."""
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, 40), np.linspace(-1, 1, 48), np.linspace(-1, 1, 30), indexing="ij"
    )
    rng = np.random.default_rng(0)
    volume = 50 + 10 * rng.standard_normal(x.shape) + 200 * (x**2 + y**2 + z**2 < 0.5)
    volume[:, :, :5] = 0
    volume[:, :, 25:] = 0
    clusters = (np.digitize(volume, [40, 60, 150, 230]) + (x > 0)).astype(np.uint8)
    return volume.astype(np.float32), clusters


def test_montage_slices_skips_empty_ends() -> None:
    volume, _ = _phantom()
    picks = montage_slices(volume, axis=2, num_slices=6)
    assert picks == [5, 9, 13, 16, 20, 24]
    assert montage_slices(volume, axis=0, num_slices=100) == list(range(40))
    assert montage_slices(np.zeros((3, 3, 3)), axis=1, num_slices=2) == [0, 2]


def test_cluster_montage_png(tmp_path: Path) -> None:
    volume, clusters = _phantom()
    path = render_cluster_montage(volume, clusters, axis=2, path=tmp_path / "clusters.png")

    assert path == tmp_path / "clusters.png"
    assert path.stat().st_size > 20_000
    image = imread(path)
    # 12 slices: 4 columns × 3 rows of 2.4-inch tiles at 100 dpi.
    assert image.shape[2] == 4
    assert image.shape[1] == 960
    assert image.shape[0] > 700
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.png"]
    # Several distinct overlay colours are visible, not just gray.
    rgb = image[..., :3].reshape(-1, 3)
    coloured = rgb[np.ptp(rgb, axis=1) > 0.1]
    assert len(np.unique(np.round(coloured, 1), axis=0)) >= 5


def test_label_montage_with_names_and_colours(tmp_path: Path) -> None:
    volume, clusters = _phantom()
    labels = (clusters >= 4).astype(np.uint8) + (clusters == 5)
    path = render_label_montage(
        volume,
        labels,
        axis=0,
        path=tmp_path / "labels.png",
        num_slices=5,
        names={1: "organ", 2: "lesion"},
        colors={1: "#e6194b", 2: "#3cb44b"},
    )
    image = imread(path)
    assert image.shape[2] == 4
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.45) & (image[..., 2] < 0.45)
    assert red.sum() > 100


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    volume, clusters = _phantom()
    with pytest.raises(ValueError, match="same shape"):
        render_cluster_montage(volume, clusters[:-1], axis=2, path=tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
