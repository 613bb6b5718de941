from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segassist.models.volumes import (
    IGNORE_INDEX,
    SparseLabels,
    annotated_slices,
    iter_slices,
    load_volume,
    stack_slices,
)


def test_load_volume_keeps_voxel_order_and_affine(tmp_path: Path) -> None:
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    affine = np.array(
        [[0.0, 0.0, -2.5, 10.0], [0.75, 0.0, 0.0, -3.0], [0.0, -0.75, 0.0, 7.0], [0, 0, 0, 1]]
    )
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    volume, loaded_affine = load_volume(path)

    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, data.astype(np.float32))
    np.testing.assert_array_equal(loaded_affine, affine)


def test_load_volume_accepts_single_4d_frame_and_rejects_series(tmp_path: Path) -> None:
    one = tmp_path / "one.nii"
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4, 1), np.float32), np.eye(4)), one)
    assert load_volume(one)[0].shape == (2, 3, 4)

    series = tmp_path / "series.nii"
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4, 2), np.float32), np.eye(4)), series)
    with pytest.raises(ValueError, match="3D"):
        load_volume(series)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_round_trip(axis: int) -> None:
    volume = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    slices = list(iter_slices(volume, axis))

    assert len(slices) == volume.shape[axis]
    np.testing.assert_array_equal(slices[1], np.take(volume, 1, axis=axis))
    np.testing.assert_array_equal(stack_slices(slices, axis), volume)


def test_slice_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="3D"):
        list(iter_slices(np.zeros((3, 4)), 0))
    with pytest.raises(ValueError, match="axis"):
        list(iter_slices(np.zeros((3, 4, 5)), 3))
    with pytest.raises(ValueError, match="one shape"):
        stack_slices([np.zeros((2, 2)), np.zeros((2, 3))], 0)


def test_annotated_slices_finds_slices_with_any_label_including_background() -> None:
    labels = np.full((6, 5, 4), IGNORE_INDEX, np.uint8)
    labels[1, 2, 3] = 0  # background is an annotation
    labels[4] = 1
    assert annotated_slices(labels, 0) == [1, 4]
    assert annotated_slices(labels, 2) == [0, 1, 2, 3]
    assert annotated_slices(np.full((2, 2, 2), IGNORE_INDEX, np.uint8), 1) == []


def test_sparse_labels_reports_classes_and_rejects_out_of_range() -> None:
    labels = np.full((4, 4, 4), IGNORE_INDEX, np.uint8)
    labels[2] = 0
    labels[2, 1:3, 1:3] = 3
    sparse = SparseLabels(labels)

    assert sparse.classes_present() == [0, 3]
    assert sparse.annotated_slices(0) == [2]
    sparse.check(num_classes=4, shape=(4, 4, 4))
    with pytest.raises(ValueError, match=r"label values \[3\] out of range"):
        sparse.check(num_classes=3)
    with pytest.raises(ValueError, match="differs from image shape"):
        sparse.check(num_classes=4, shape=(4, 4, 5))
