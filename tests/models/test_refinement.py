"""The refinement's held-out slice and candidates (:mod:`segassist.models.held_out_slice`,
:mod:`segassist.models.refinement`)."""

from __future__ import annotations

import numpy as np
import pytest

from segassist.models.held_out_slice import hold_out_middle_slice
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.refinement import (
    CANDIDATES,
    candidates,
    choose,
    geometric_mean,
    network_probabilities,
)
from segassist.models.runtime.configs import IGNORE_INDEX


def _sparse(labelled: list[int], axis: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, size=(9, 8, 7)).astype(np.uint8)
    sparse = np.full(truth.shape, IGNORE_INDEX, dtype=np.uint8)
    index = [slice(None)] * 3
    index[axis] = labelled  # type: ignore[call-overload]
    sparse[tuple(index)] = truth[tuple(index)]
    return sparse


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_middle_labelled_slice_is_hidden_and_the_input_kept(axis: int) -> None:
    sparse = _sparse([0, 2, 5, 6], axis)
    before = sparse.copy()
    hidden = hold_out_middle_slice(sparse, axis)
    assert hidden is not None
    assert hidden.index == 5  # the (k // 2)-th of 0, 2, 5, 6
    np.testing.assert_array_equal(sparse, before)
    np.testing.assert_array_equal(hidden.truth, np.take(before, 5, axis=axis))
    assert (np.take(hidden.labels, 5, axis=axis) == IGNORE_INDEX).all()
    for other in (0, 2, 6):
        np.testing.assert_array_equal(
            np.take(hidden.labels, other, axis=axis), np.take(before, other, axis=axis)
        )


def test_fewer_than_three_labelled_slices_hold_nothing_out() -> None:
    assert hold_out_middle_slice(_sparse([1, 4], 2), 2) is None
    assert hold_out_middle_slice(_sparse([3], 0), 0) is None


def test_dice_on_the_hidden_slice_against_a_brute_force() -> None:
    sparse = _sparse([1, 3, 5], 1, seed=1)
    sparse[0, 3, :] = IGNORE_INDEX  # a partly drawn slice: only drawn voxels count
    hidden = hold_out_middle_slice(sparse, 1)
    assert hidden is not None
    rng = np.random.default_rng(2)
    for _ in range(5):
        guess = rng.integers(0, 3, size=sparse.shape).astype(np.uint8)
        truth, predicted = [], []
        for x in range(sparse.shape[0]):
            for z in range(sparse.shape[2]):
                if sparse[x, 3, z] != IGNORE_INDEX:
                    truth.append(int(sparse[x, 3, z]))
                    predicted.append(int(guess[x, 3, z]))
        scores = []
        for c in sorted(set(truth) | set(predicted)):
            both = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
            scores.append(2 * both / (truth.count(c) + predicted.count(c)))
        assert hidden.dice(guess) == pytest.approx(np.mean(scores))
    perfect = np.where(sparse == IGNORE_INDEX, 0, sparse)
    assert hidden.dice(perfect) == 1.0


def test_candidates_are_propagation_and_the_experts_geometric_mean() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    n = rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    made = candidates(p, n)
    assert tuple(made) == CANDIDATES == ("propagation", "blend")
    assert made["propagation"] is p
    product = np.sqrt(p.astype(np.float64) * n)
    np.testing.assert_allclose(made["blend"], product / product.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(made["blend"].sum(axis=0), 1.0, rtol=1e-5)
    assert made["blend"].dtype == np.float32
    # a class needs both experts: one sure of it (0.9) while the other nearly rules it out
    # (0.05) loses to the class both find possible (0.1 and 0.6); the mean picks the first
    sure = np.array([0.9, 0.1, 0.0], dtype=np.float32)[:, None, None, None]
    doubt = np.array([0.05, 0.6, 0.35], dtype=np.float32)[:, None, None, None]
    assert candidates(sure, doubt)["blend"].argmax() == 1
    assert ((sure + doubt) / 2).argmax() == 0
    # a softmax that underflowed to 0 leaves a distribution, not NaN
    assert np.isfinite(candidates(sure, sure)["blend"]).all()
    with pytest.raises(ValueError, match="shapes differ"):
        candidates(p, n[:, :2])


def test_the_blend_can_be_written_over_either_expert() -> None:
    """``out`` = one of the inputs gives the same blend, to the bit, in that array."""
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(4), size=(5, 6, 7)).transpose(3, 0, 1, 2).astype(np.float32)
    n = rng.dirichlet(np.ones(4), size=(5, 6, 7)).transpose(3, 0, 1, 2).astype(np.float32)
    fresh = geometric_mean(p, n)
    for target in ("first", "second"):
        first, second = p.copy(), n.copy()
        out = first if target == "first" else second
        written = geometric_mean(first, second, out=out)
        assert written is out
        np.testing.assert_array_equal(written, fresh)


def test_the_best_score_wins_and_ties_go_to_the_cheaper() -> None:
    assert choose({"propagation": 0.7, "blend": 0.75}) == "blend"
    assert choose({"propagation": 0.8, "blend": 0.8}) == "propagation"
    assert choose({"propagation": 0.8, "blend": 0.6}) == "propagation"
    assert choose({"blend": 0.1}) == "blend"
    with pytest.raises(ValueError, match="no candidate"):
        choose({"other": 1.0})


def test_a_refit_must_beat_the_answer_it_replaced() -> None:
    """The earlier answer wins ties: the annotator's segmentation changes only for a better one."""
    assert choose({"previous": 0.8, "propagation": 0.8, "blend": 0.8}) == "previous"
    assert choose({"previous": 0.8, "propagation": 0.7, "blend": 0.79}) == "previous"
    assert choose({"previous": 0.8, "propagation": 0.7, "blend": 0.81}) == "blend"
    assert choose({"previous": 0.5, "propagation": 0.7, "blend": 0.7}) == "propagation"


class _Stop(Exception):
    pass


def test_network_probabilities_slice_by_slice_with_a_hook_before_each_batch() -> None:
    encoder = Encoder.random(PretrainConfig(channels=(4, 8), num_clusters=3, seed=0))
    segmenter = SegmenterNet(encoder.network, 2, 3)
    volume = np.random.default_rng(0).normal(size=(12, 10, 7)).astype(np.float32)
    calls: list[int] = []
    probabilities = network_probabilities(
        segmenter, volume, 2, batch_size=3, before_batch=lambda: calls.append(1)
    )
    assert probabilities.shape == (2, 12, 10, 7) and len(calls) == 3  # 7 slices, 3 at a time
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, rtol=1e-5)
    # each slice on its own gives the same: the network sees one slice at a time
    one = network_probabilities(segmenter, volume[..., 4:5], 2)
    np.testing.assert_allclose(probabilities[..., 4:5], one, atol=1e-5)
    # slice-major underneath: the slice prior fuses over it without a copy
    assert np.moveaxis(probabilities, 3, 0).flags.c_contiguous

    def stop() -> None:  # a cancellation check that fires raises out of the loop
        raise _Stop

    with pytest.raises(_Stop):
        network_probabilities(segmenter, volume, 2, before_batch=stop)
