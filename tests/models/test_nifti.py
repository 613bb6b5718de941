"""NIfTI round trips keep the reference geometry exactly (affine, qform/sform and their codes)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segassist.models.runtime.nifti import read_nifti, write_nifti_atomic


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(17.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]]
    )
    shear = np.array([[1.0, 0.13, 0.0], [0.0, 1.0, 0.07], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ shear @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-101.3, 57.25, -33.125]
    return affine


def _load(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def _lps_affine() -> np.ndarray:
    return np.array(
        [
            [-0.8, 0.0, 0.0, 120.5],
            [0.0, -0.8, 0.0, 98.25],
            [0.0, 0.0, 3.0, -40.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _reference(tmp_path: Path, affine: np.ndarray, qform_code: int, sform_code: int) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 2000, size=(7, 6, 5)).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    path = tmp_path / "image.nii.gz"
    nib.save(image, path)
    return path


@pytest.mark.parametrize(
    ("affine", "qform_code", "sform_code"),
    [(_oblique_affine(), 1, 2), (_lps_affine(), 1, 1), (_lps_affine(), 2, 0)],
    ids=["oblique", "lps", "lps-qform-only"],
)
def test_round_trip_keeps_geometry(
    tmp_path: Path, affine: np.ndarray, qform_code: int, sform_code: int
) -> None:
    ref_path = _reference(tmp_path, affine, qform_code, sform_code)
    _, ref_affine, ref_header = read_nifti(ref_path)
    labels = (np.arange(7 * 6 * 5) % 4).reshape(7, 6, 5).astype(np.uint8)

    out = write_nifti_atomic(labels, tmp_path / "labels.nii.gz", (ref_affine, ref_header), np.uint8)
    data, out_affine, out_header = read_nifti(out)
    ref = _load(ref_path)
    written = _load(out)

    assert np.array_equal(out_affine, ref_affine)
    assert np.array_equal(written.header.get_sform(), ref.header.get_sform())
    assert np.array_equal(written.header.get_qform(), ref.header.get_qform())
    assert int(written.header["sform_code"]) == int(ref.header["sform_code"]) == sform_code
    assert int(written.header["qform_code"]) == int(ref.header["qform_code"]) == qform_code
    assert data.dtype == np.uint8
    assert np.array_equal(data, labels)
    assert out_header.get_data_dtype() == np.uint8


def test_reference_scaling_does_not_leak_into_labels(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), _lps_affine())
    image.header.set_slope_inter(2.0, -1024.0)
    ref_path = tmp_path / "ct.nii"
    nib.save(image, ref_path)
    labels = np.full((4, 4, 3), 3, np.uint8)

    out = write_nifti_atomic(labels, tmp_path / "labels.nii", _load(ref_path), np.uint8)

    assert np.array_equal(read_nifti(out)[0], labels)


def test_float_probabilities_with_extra_axis(tmp_path: Path) -> None:
    ref_path = _reference(tmp_path, _oblique_affine(), 1, 2)
    probs = np.random.default_rng(1).random((7, 6, 5, 3)).astype(np.float32)

    out = write_nifti_atomic(probs, tmp_path / "p.nii.gz", _load(ref_path), np.float32)
    data, affine, _ = read_nifti(out)

    assert np.array_equal(data, probs)
    assert np.array_equal(affine, _load(ref_path).affine)


def test_rejects_values_that_do_not_fit(tmp_path: Path) -> None:
    ref = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="do not fit uint8"):
        write_nifti_atomic(np.full((2, 2, 2), 300), tmp_path / "x.nii.gz", ref, np.uint8)
    with pytest.raises(ValueError, match="non-integer"):
        write_nifti_atomic(np.full((2, 2, 2), 0.5), tmp_path / "x.nii.gz", ref, np.uint8)
    assert not list(tmp_path.iterdir())


def test_rejects_shape_mismatch_and_leaves_existing_file(tmp_path: Path) -> None:
    ref = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    dest = tmp_path / "x.nii.gz"
    write_nifti_atomic(np.ones((2, 2, 2), np.uint8), dest, ref, np.uint8)
    with pytest.raises(ValueError, match="spatial shape"):
        write_nifti_atomic(np.ones((2, 3, 2), np.uint8), dest, ref, np.uint8)
    assert np.array_equal(read_nifti(dest)[0], np.ones((2, 2, 2), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
