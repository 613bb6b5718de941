"""The slice-interpolation prior and its fusion with a model's prediction, on synthetic discs."""

from __future__ import annotations

import numpy as np
import pytest

from segassist.models.slice_prior import (
    DEFAULT_SCALE,
    EDGE_WIDTH,
    PRIOR_FLOOR,
    SCALE_GRID,
    SlicePrior,
    choose_scale,
    fuse_with_prior,
)
from segassist.models.volumes import IGNORE_INDEX
from tests.models.sparse_slices import dice, sparse_on

SIZE, SLICES = 64, 21


def _disc(z: int, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """A disc whose centre moves from (20, 20) to (40, 40) (more than its radius between two
    labelled slices 10 apart) and radius grows 8 → 16 over z ∈ [0, 20]."""
    t = z / (SLICES - 1)
    centre, radius = 20 + 20 * t, 8 + 8 * t
    x, y = np.mgrid[: shape[0], : shape[1]]
    return (x - centre) ** 2 + (y - centre) ** 2 <= radius**2


def _truth() -> np.ndarray:
    return np.stack([_disc(z) for z in range(SLICES)], axis=2).astype(np.uint8)


def _naive_signed_distance(mask: np.ndarray) -> np.ndarray:
    """Brute force: distance to the nearest pixel of the other side, ∓ ½ (the module's rule)."""
    points = np.argwhere(np.ones_like(mask))
    out = np.empty(mask.shape)
    for x, y in points:
        other = np.argwhere(mask != mask[x, y])
        nearest = np.sqrt(((other - (x, y)) ** 2).sum(axis=1)).min()
        out[x, y] = 0.5 - nearest if mask[x, y] else nearest - 0.5
    return out


def test_prior_matches_a_naive_reference_between_labelled_slices() -> None:
    x, y = np.mgrid[:12, :12]
    radius = np.array([2.0, 5.0])
    truth = np.stack([(x - 6) ** 2 + (y - 6) ** 2 <= r**2 for r in radius], axis=2)
    sparse = np.full((12, 12, 11), IGNORE_INDEX, dtype=np.uint8)
    sparse[:, :, [0, 10]] = truth  # a growing disc, its centre still (no translation)
    prior = SlicePrior.from_sparse(sparse, 2, 2)
    t = 4 / 10
    disc = (1 - t) * _naive_signed_distance(truth[:, :, 0]) + t * _naive_signed_distance(
        truth[:, :, 1]
    )
    q = 1 / (1 + np.exp(np.stack([-disc, disc]) / EDGE_WIDTH))
    expected = (1 - PRIOR_FLOOR) * q / q.sum(axis=0) + PRIOR_FLOOR / 2
    np.testing.assert_allclose(np.exp(prior.log_probabilities(4)), expected, atol=1e-5)


def test_moving_growing_disc_is_interpolated() -> None:
    truth = _truth()
    prior = SlicePrior.from_sparse(sparse_on(truth, [0, 10, 20]), 2, 2)
    for z in [z for z in range(SLICES) if z not in (0, 10, 20)]:
        predicted = prior.log_probabilities(z).argmax(0) == 1
        assert dice(predicted, truth[:, :, z] == 1) >= 0.9, z
    assert prior.weight[[0, 10, 20]].tolist() == [1.0, 1.0, 1.0]
    assert prior.weight[5] == pytest.approx(0.5)


def test_absent_class_on_a_labelled_slice_stops_the_interpolation() -> None:
    truth = _truth()
    truth[:, :, 16:] = 0  # the disc ends after slice 15; slice 20 is labelled without it
    prior = SlicePrior.from_sparse(sparse_on(truth, [0, 10, 20]), 2, 2)
    foreground = [np.exp(prior.log_probabilities(z)[1]).max() for z in range(SLICES)]
    assert foreground[11] > 0.5  # next to slice 10 the disc goes on
    assert foreground[15] <= 0.5  # half-way: eroded to its centre
    assert foreground[16] > foreground[17] > foreground[18] > foreground[19]  # the edge fades
    assert foreground[20] <= PRIOR_FLOOR  # on the empty labelled slice only the floor remains
    assert not any((prior.log_probabilities(z).argmax(0) == 1).any() for z in range(16, 21))


def test_one_labelled_slice_informs_only_its_neighbours() -> None:
    prior = SlicePrior.from_sparse(sparse_on(_truth(), [10]), 2, 2)
    near = np.flatnonzero(prior.weight > 0).tolist()
    assert near == list(range(7, 14))
    assert prior.weight[10] == 1.0
    assert prior.weight[9] == prior.weight[11] > prior.weight[8] > prior.weight[7] > 0


def test_fusion_with_a_uniform_model_follows_the_prior_where_weighted() -> None:
    truth = _truth()
    sparse = sparse_on(truth, [0, 10, 20])
    uniform = np.full((2, *truth.shape), 0.5, dtype=np.float32)
    fused = fuse_with_prior(uniform, sparse, 2, scale=1.0)
    prior = SlicePrior.from_sparse(sparse, 2, 2)
    for z in (3, 5, 14):
        expected = prior.log_probabilities(z).argmax(0)
        np.testing.assert_array_equal(fused.labels[:, :, z], expected)
    np.testing.assert_array_equal(fused.labels[:, :, [0, 10, 20]], truth[:, :, [0, 10, 20]])


def test_fusion_leaves_the_model_where_the_weight_is_zero() -> None:
    truth = _truth()
    sparse = sparse_on(truth, [10])  # weight 0 below slice 7 and above 13
    rng = np.random.default_rng(0)
    model = rng.dirichlet([1.0, 1.0], size=truth.shape).transpose(3, 0, 1, 2).astype(np.float32)
    fused = fuse_with_prior(model, sparse, 2, scale=4.0)
    for z in (0, 5, 15, 20):
        np.testing.assert_allclose(fused.probabilities[:, :, :, z], model[:, :, :, z])
    assert fused.choice.source == "given"


def test_reuse_fuses_over_a_slice_major_input_and_changes_nothing_else() -> None:
    """``reuse`` writes the fused probabilities over a slice-major input (propagation's layout)
    instead of a copy, to the bit; an input of another layout is copied and left alone."""
    truth = _truth()
    sparse = sparse_on(truth, [0, 10, 20])
    rng = np.random.default_rng(1)
    slice_major = rng.dirichlet([1.0, 1.0], size=(SLICES, SIZE, SIZE)).astype(np.float32)
    slice_major = np.ascontiguousarray(slice_major.transpose(0, 3, 1, 2))  # Z×L×X×Y
    model = np.moveaxis(slice_major, 0, 3)  # L×X×Y×Z view, as propagate returns
    copied = fuse_with_prior(model.copy(), sparse, 2, DEFAULT_SCALE)
    reused = fuse_with_prior(model, sparse, 2, DEFAULT_SCALE, reuse=True)
    assert np.shares_memory(reused.probabilities, slice_major)
    np.testing.assert_array_equal(reused.probabilities, copied.probabilities)
    np.testing.assert_array_equal(reused.labels, copied.labels)
    class_major = np.ascontiguousarray(np.moveaxis(copied.probabilities, 3, 1))  # L×Z-first
    other = np.moveaxis(class_major, 1, 3)
    before = other.copy()
    again = fuse_with_prior(other, sparse, 2, DEFAULT_SCALE, reuse=True)
    assert not np.shares_memory(again.probabilities, class_major)
    np.testing.assert_array_equal(other, before)


def _model_probabilities(labels: np.ndarray, confidence: float) -> np.ndarray:
    one_hot = np.stack([labels == 0, labels == 1]).astype(np.float32)
    return confidence * one_hot + (1 - confidence) / 2


def test_leave_one_out_trusts_a_perfect_model() -> None:
    truth = _truth()
    sparse = sparse_on(truth, [0, 5, 10, 15, 20])
    prior = SlicePrior.from_sparse(sparse, 2, 2)
    choice = choose_scale(prior, _model_probabilities(truth, 0.98), sparse)
    assert choice.source == "leave-one-out"
    assert choice.held_out == 6
    assert choice.scale == min(SCALE_GRID)


def test_leave_one_out_trusts_the_prior_over_a_noise_model() -> None:
    truth = _truth()
    sparse = sparse_on(truth, [0, 5, 10, 15, 20])
    prior = SlicePrior.from_sparse(sparse, 2, 2)
    noise = np.random.default_rng(0).integers(0, 2, size=truth.shape)
    choice = choose_scale(prior, _model_probabilities(noise, 0.9), sparse)
    assert choice.scale == max(SCALE_GRID)
    assert choice.scores[max(SCALE_GRID)] > choice.scores[0.0]


def test_too_few_labelled_slices_take_the_default_scale() -> None:
    truth = _truth()
    sparse = sparse_on(truth, [0, 20])
    choice = fuse_with_prior(_model_probabilities(truth, 0.9), sparse, 2).choice
    assert (choice.scale, choice.source) == (DEFAULT_SCALE, "default")
