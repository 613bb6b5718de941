"""The grid benchmark's helpers (:mod:`segassist.bench.propagation_grid`): the budget that gives
a chosen grid factor, and the in-plane zoom of a large image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segassist.bench.fewshot import _Volume
from segassist.bench.propagation_grid import _budget, _zoomed
from segassist.models.datasets import Case
from segassist.models.propagation import grid_factor


@pytest.mark.parametrize(
    "shape, axis", [((122, 101, 112), 2), ((73, 47, 73), 1), ((20, 91, 117), 0)]
)
@pytest.mark.parametrize("factor", [1, 2, 3, 5])
def test_the_budget_gives_the_grid_factor_it_is_set_for(
    shape: tuple[int, int, int], axis: int, factor: int
) -> None:
    in_plane = tuple(n for i, n in enumerate(shape) if i != axis)
    assert (
        grid_factor(shape[axis], (in_plane[0], in_plane[1]), _budget(shape, axis, factor)) == factor
    )


def test_zoom_scales_the_slices_not_the_stack() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    case = Case("toy", Path("i.nii.gz"), Path("l.nii.gz"), "CT", {1: "a", 2: "b"}, 2)
    zoomed = _zoomed(_Volume(case, label.astype(np.float32), label), 3)
    assert zoomed.image.shape == zoomed.label.shape == (18, 15, 4)
    # labels by nearest neighbour: each voxel's block keeps its value
    np.testing.assert_array_equal(zoomed.label[1::3, 1::3], label)
