"""keep_seeded_components against constructed cases and a brute-force flood fill."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from segassist.models.seeded_components import keep_seeded_components
from tests.models.sparse_slices import sparse_on


def _flood(mask: np.ndarray, start: tuple[int, int, int]) -> set[tuple[int, int, int]]:
    """Voxels of ``mask`` reachable from ``start`` through 26-neighbours, one step at a time."""
    seen, queue = {start}, deque([start])
    steps = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
    while queue:
        x, y, z = queue.popleft()
        for dx, dy, dz in steps:
            n = (x + dx, y + dy, z + dz)
            if n not in seen and all(0 <= n[i] < mask.shape[i] for i in range(3)) and mask[n]:
                seen.add(n)
                queue.append(n)
    return seen


def test_an_unseeded_look_alike_is_removed_and_the_seeded_object_kept() -> None:
    labels = np.zeros((16, 16, 12), dtype=np.uint8)
    labels[3:8, 3:8, 2:9] = 1  # the structure, labelled on slice 5
    labels[11:14, 11:14, 9:12] = 1  # look-alike tissue on slices nobody labelled
    filtered, removed, report = keep_seeded_components(labels, sparse_on(labels, [5]))
    assert filtered[3:8, 3:8, 2:9].all()
    assert not filtered[11:14, 11:14, 9:12].any()
    assert removed.sum() == 27 == report.removed_voxels
    assert report.removed == {1: 1} and report.several_objects == []


def test_objects_the_labelled_slices_show_apart_are_all_kept() -> None:
    labels = np.zeros((16, 16, 15), dtype=np.uint8)
    for start in (0, 5, 10):  # three "vertebrae" of one class, separated by "discs"
        labels[4:10, 4:10, start : start + 4] = 1
    filtered, removed, report = keep_seeded_components(labels, sparse_on(labels, [1, 11]))
    np.testing.assert_array_equal(filtered, labels)  # the middle one, unlabelled, stays
    assert not removed.any() and report.several_objects == [1]


def test_a_class_never_drawn_is_kept_and_other_classes_are_independent() -> None:
    labels = np.zeros((16, 16, 12), dtype=np.uint8)
    labels[2:6, 2:6, 2:10] = 1
    labels[10:14, 10:14, 0:3] = 2  # class 2 predicted, never drawn: no evidence
    labels[10:14, 2:5, 8:11] = 1  # a second class-1 object, unseeded
    sparse = sparse_on(labels, [5])
    filtered, _, report = keep_seeded_components(labels, sparse)
    assert (filtered == 2).sum() == (labels == 2).sum()
    assert not filtered[10:14, 2:5, 8:11].any()
    assert report.removed == {1: 1}


@pytest.mark.parametrize("seed", range(8))
def test_matches_a_brute_force_flood_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.zeros((12, 12, 10), dtype=np.uint8)
    for c, _ in itertools.product((1, 2), range(3)):  # three boxes per class, some touching
        x, y, z = rng.integers(0, 9, 3)
        dx, dy, dz = rng.integers(2, 5, 3)
        labels[x : x + dx, y : y + dy, z : z + dz] = c
    slices = sorted(set(rng.integers(0, 10, 1 + seed % 2).tolist()))
    sparse = sparse_on(labels, slices)
    filtered, _, _ = keep_seeded_components(labels, sparse)
    expected = labels.copy()
    for c in (1, 2):
        seeds = [tuple(int(i) for i in v) for v in np.argwhere(sparse == c)]
        if not seeds:
            continue
        reached: list[set[tuple[int, int, int]]] = []
        for s in seeds:
            if not any(s in r for r in reached):
                reached.append(_flood(labels == c, s))
        if len(reached) == 1:  # one object holds every seed: the rest of c goes
            keep = np.zeros(labels.shape, dtype=bool)
            keep[tuple(np.array(sorted(reached[0])).T)] = True
            expected[(labels == c) & ~keep] = 0
    np.testing.assert_array_equal(filtered, expected)


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="do not match"):
        keep_seeded_components(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8))
