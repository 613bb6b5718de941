"""Label propagation through feature affinity, against brute-force references and on a synthetic
textured disc that moves between slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segassist.models.features import compute_feature_maps, head_input
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.propagation import (
    FLOOR,
    PropagationConfig,
    grid_factor,
    map_features,
    propagate,
    propagate_step,
)
from segassist.models.volumes import IGNORE_INDEX
from tests.models.sparse_slices import dice, sparse_on


def _naive_step(
    target: np.ndarray, source: np.ndarray, labels: np.ndarray, config: PropagationConfig
) -> np.ndarray:
    """Brute force, pixel by pixel: centred cosine affinity to the in-slice window, top-k (every
    pixel tied with the k-th largest kept), softmax, weighted mean of the source labels."""
    mean = (target.mean(axis=(1, 2)) + source.mean(axis=(1, 2)))[:, None, None] / 2
    t, s = target - mean, source - mean
    t = t / np.maximum(np.linalg.norm(t, axis=0), 1e-6)
    s = s / np.maximum(np.linalg.norm(s, axis=0), 1e-6)
    _, h, w = target.shape
    r = config.radius
    out = np.zeros((labels.shape[0], h, w))
    for x in range(h):
        for y in range(w):
            window = [
                (i, j)
                for i in range(x - r, x + r + 1)
                for j in range(y - r, y + r + 1)
                if 0 <= i < h and 0 <= j < w
            ]
            affinity = np.array([t[:, x, y] @ s[:, i, j] for i, j in window])
            keep = np.flatnonzero(affinity >= np.sort(affinity)[-config.topk])
            weights = np.exp((affinity[keep] - affinity[keep].max()) / config.temperature)
            weights /= weights.sum()
            for weight, q in zip(weights, keep, strict=True):
                out[:, x, y] += weight * labels[:, window[q][0], window[q][1]]
    return out


def test_step_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    target, source = rng.normal(size=(2, 3, 9, 10)).astype(np.float32)
    labels = rng.dirichlet(np.ones(3), size=(9, 10)).transpose(2, 0, 1).astype(np.float32)
    config = PropagationConfig(radius=2, topk=5, temperature=0.2)
    out = propagate_step(target, source, labels, config)
    np.testing.assert_allclose(out, _naive_step(target, source, labels, config), atol=1e-5)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


def test_a_tie_at_the_kth_affinity_keeps_every_tied_pixel() -> None:
    """Features equal everywhere: every window pixel ties, so each target pixel takes the mean
    of its whole window's labels (cut at the slice edge), not that of ``k`` arbitrary ones."""
    features = np.ones((2, 6, 7), dtype=np.float32)
    labels = np.zeros((2, 6, 7), dtype=np.float32)
    labels[1, :, :3] = 1.0
    labels[0] = 1.0 - labels[1]
    config = PropagationConfig(radius=1, topk=2, temperature=0.1)
    out = propagate_step(features, features, labels, config)
    window_mean = ndimage.uniform_filter(
        labels[1], size=3, mode="constant"
    ) / ndimage.uniform_filter(np.ones((6, 7)), size=3, mode="constant")
    np.testing.assert_allclose(out[1], window_mean, atol=1e-6)
    np.testing.assert_allclose(out, _naive_step(features, features, labels, config), atol=1e-6)


def test_propagate_chains_both_ways_and_blends_by_distance() -> None:
    rng = np.random.default_rng(1)
    slices, classes = 9, 3
    feats = rng.normal(size=(slices, 2, 7, 6)).astype(np.float32)
    truth = rng.integers(0, classes, size=(7, 6, slices)).astype(np.uint8)
    known = [2, 6]
    config = PropagationConfig(radius=1, topk=4, temperature=0.5)
    result = propagate(lambda z: feats[z], sparse_on(truth, known), 2, classes, config)

    def one_hot(z: int) -> np.ndarray:
        return np.eye(classes)[truth[:, :, z]].transpose(2, 0, 1)

    def chain(start: int, stop: int) -> dict[int, np.ndarray]:
        labels, out, step = one_hot(start), {}, 1 if stop > start else -1
        for z in range(start + step, stop + step, step):
            labels = _naive_step(feats[z], feats[z - step], labels, config)
            out[z] = labels
        return out

    down2, up2, down6, up6 = chain(2, 0), chain(2, 5), chain(6, 3), chain(6, 8)
    expected = np.empty((classes, 7, 6, slices))
    for z in range(slices):
        if z in known:
            expected[..., z] = one_hot(z)
            continue
        if z < 2:
            p = down2[z]
        elif z > 6:
            p = up6[z]
        else:
            p = ((6 - z) * up2[z] + (z - 2) * down6[z]) / 4
        expected[..., z] = (1 - FLOOR) * p + FLOOR / classes
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.weight, np.ones(slices))
    np.testing.assert_array_equal(result.labels, expected.argmax(axis=0))
    # the four chains ran in threads (one per core); one at a time gives the same bits
    serial = PropagationConfig(radius=1, topk=4, temperature=0.5, workers=1)
    one = propagate(lambda z: feats[z], sparse_on(truth, known), 2, classes, serial)
    np.testing.assert_array_equal(one.probabilities, result.probabilities)


SIZE, SLICES, STEP, CHANNELS = 48, 15, 2, 16


def _moving_disc(smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A disc of radius 7 moving ``STEP`` pixels per slice along x, in a noise texture that
    moves with it (a tilted stack of slices): no feature value tells the disc from its
    surroundings, only matching does. ``smoothing``: σ in pixels of a Gaussian filter of the
    texture (white noise by default; real features vary smoothly). Returns the labels
    ``SIZE×SIZE×SLICES`` and the features ``SLICES×CHANNELS×SIZE×SIZE``."""
    rng = np.random.default_rng(2)
    texture = rng.normal(size=(CHANNELS, SIZE + STEP * SLICES, SIZE))
    if smoothing:
        texture = ndimage.gaussian_filter(texture, (0, smoothing, smoothing))
    x, y = np.mgrid[:SIZE, :SIZE]
    truth, feats = [], []
    for z in range(SLICES):
        shift = STEP * z
        truth.append((x - 10 - shift) ** 2 + (y - 24) ** 2 <= 7**2)
        feats.append(texture[:, STEP * SLICES - shift : STEP * SLICES - shift + SIZE])
    return np.stack(truth, axis=2).astype(np.uint8), np.stack(feats).astype(np.float32)


@pytest.mark.parametrize("known", [[7], [2, 12]])
def test_propagation_follows_a_moving_textured_disc(known: list[int]) -> None:
    truth, feats = _moving_disc()
    result = propagate(lambda z: feats[z], sparse_on(truth, known), 2, 2)
    below = [z for z in range(SLICES) if z < known[0]]
    above = [z for z in range(SLICES) if z > known[-1]]
    for side in (below, above):  # both directions
        assert dice(result.labels[:, :, side] == 1, truth[:, :, side] == 1) > 0.9
    unlabelled = [z for z in range(SLICES) if z not in known]
    propagated = dice(result.labels[:, :, unlabelled] == 1, truth[:, :, unlabelled] == 1)
    # copying the nearest labelled shape (the prior's extrapolation) misses the moving disc
    nearest = [min(known, key=lambda j: abs(j - z)) for z in unlabelled]
    copied = dice(truth[:, :, nearest] == 1, truth[:, :, unlabelled] == 1)
    assert propagated > 0.9 > copied + 0.2


def test_max_distance_stops_the_chains_and_labelled_slices_stay_as_drawn() -> None:
    truth, feats = _moving_disc()
    sparse = sparse_on(truth, [7])
    sparse[:5, :5, 7] = IGNORE_INDEX  # unannotated pixels of a labelled slice: background
    config = PropagationConfig(max_distance=3)
    result = propagate(lambda z: feats[z], sparse, 2, 2, config)
    expected_weight = (np.abs(np.arange(SLICES) - 7) <= 3).astype(np.float32)
    np.testing.assert_array_equal(result.weight, expected_weight)
    np.testing.assert_allclose(result.probabilities[:, :, :, expected_weight == 0], 0.5)
    np.testing.assert_array_equal(result.probabilities[1, :, :, 7], truth[:, :, 7])
    propagated = result.probabilities[:, :, :, [4, 5, 6, 8, 9, 10]]
    assert propagated.min() >= FLOOR / 2 - 1e-7  # the floor keeps every class possible


def test_grid_factor_is_the_smallest_that_fits_the_budget() -> None:
    assert grid_factor(300, (512, 512), None) == 1
    assert grid_factor(300, (512, 512), 300 * 512 * 512) == 1
    assert grid_factor(300, (512, 512), 4_000_000) == 5  # 300·103·103 = 3.18 M; f = 4: 4.9 M
    assert grid_factor(10, (5, 7), 10 * 3 * 4) == 2  # partial edge blocks count as blocks
    assert grid_factor(10, (5, 7), 1) == 7  # never below one pixel per slice


@pytest.mark.parametrize("factor", [2, 3])
def test_a_large_volume_is_propagated_on_a_pooled_grid(factor: int) -> None:
    """The disc's slices pooled ``factor``-fold in-plane (a smooth texture: pooled white noise
    would change with the disc's 2-pixel shift): the disc is still followed, the output is on
    the full grid, a distribution, the labelled slice as drawn."""
    truth, feats = _moving_disc(smoothing=3.0)
    sparse = sparse_on(truth, [7])
    coarse = -(-SIZE // factor)
    config = PropagationConfig(max_voxels=SLICES * coarse * coarse)
    assert grid_factor(SLICES, (SIZE, SIZE), config.max_voxels) == factor
    result = propagate(lambda z: feats[z], sparse, 2, 2, config)
    assert result.probabilities.shape == (2, SIZE, SIZE, SLICES)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.labels[:, :, 7], truth[:, :, 7])
    unlabelled = [z for z in range(SLICES) if z != 7]
    pooled = dice(result.labels[:, :, unlabelled] == 1, truth[:, :, unlabelled] == 1)
    copied = dice(truth[:, :, [7] * len(unlabelled)] == 1, truth[:, :, unlabelled] == 1)
    assert pooled > 0.75 > copied + 0.2  # full resolution: 0.93; subpixel shifts blur a little
    full = propagate(lambda z: feats[z], sparse, 2, 2, PropagationConfig(max_voxels=truth.size))
    exact = propagate(lambda z: feats[z], sparse, 2, 2)
    np.testing.assert_array_equal(full.probabilities, exact.probabilities)  # within budget


def test_errors() -> None:
    truth, feats = _moving_disc()
    with pytest.raises(ValueError, match="no labelled slice"):
        propagate(lambda z: feats[z], np.full(truth.shape, IGNORE_INDEX, np.uint8), 2, 2)
    with pytest.raises(ValueError, match="classes"):
        propagate(lambda z: feats[z], sparse_on(truth * 2, [7]), 2, 2)
    with pytest.raises(ValueError, match="unknown features"):
        map_features(None, "coarse")  # type: ignore[arg-type]


def test_map_features_are_what_the_multiscale_head_reads(tmp_path: Path) -> None:
    encoder = Encoder.random(PretrainConfig(channels=(4, 8, 16), num_clusters=3, seed=1))
    volume = np.random.default_rng(0).random((22, 20, 3), dtype=np.float32)
    features = compute_feature_maps(encoder, volume, 2, tmp_path / "entry")
    segmenter = SegmenterNet(encoder.network, 2, 3, multiscale=True)
    expected = head_input(segmenter, features, [1])[0].numpy()
    np.testing.assert_allclose(map_features(features, "all")(1), expected, atol=1e-6)
    np.testing.assert_array_equal(map_features(features, "fine")(1), expected[:4])
