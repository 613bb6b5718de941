"""NRRD geometry in Slicer's LPS world and the viewer-label rule, on small arrays.

The NRRD files are read back with ITK (what 3D Slicer's SimpleITK is built on), not with the
library that wrote them, and compared with the NIfTI affine through nibabel.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segassist.server.ingest import IngestError
from segassist.server.monailabel.sparse import annotation_axis, map_segments, sparse_from_viewer
from segassist.server.monailabel.volumes import encode_result, nrrd_to_nifti

# Oblique, sheared, with a flip: every mistake in the RAS→LPS flip or the axis order shows.
AFFINE = np.array(
    [
        [0.0, -0.9, 0.1, 80.25],
        [1.1, 0.0, 0.0, -12.5],
        [0.0, 0.05, 3.0, 7.125],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (7, 5, 4)


def _itk_world(path: Path, index: tuple[int, int, int]) -> np.ndarray:
    import itk

    image = itk.imread(str(path))
    return np.array(image.TransformIndexToPhysicalPoint(itk.Index[3](index)))


def _lps(affine: np.ndarray, index: tuple[int, int, int]) -> np.ndarray:
    ras = affine @ np.array([*index, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])


@pytest.mark.parametrize("compress", [True, False])
def test_nrrd_result_puts_every_voxel_where_the_nifti_voxel_is(
    tmp_path: Path, compress: bool
) -> None:
    import itk

    data = np.random.default_rng(0).integers(0, 4, SHAPE).astype(np.uint8)
    reference = nib.Nifti1Image(data, AFFINE)
    path = tmp_path / "result.nrrd"
    path.write_bytes(encode_result(data, reference, ".nrrd", "uint8", compress=compress))

    image = itk.imread(str(path))
    assert itk.template(image)[1][0] is itk.UC  # uint8, as Slicer asked
    values = itk.array_from_image(image).transpose(2, 1, 0)  # ITK arrays are Z×Y×X
    np.testing.assert_array_equal(values, data)
    for index in [(0, 0, 0), (6, 0, 0), (0, 4, 0), (0, 0, 3), (6, 4, 3), (3, 2, 1)]:
        np.testing.assert_allclose(_itk_world(path, index), _lps(AFFINE, index), atol=1e-6)


def test_nifti_result_keeps_the_reference_affine() -> None:
    data = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE) % 5
    content = encode_result(data, nib.Nifti1Image(data, AFFINE), ".nii", "int16")
    image = nib.Nifti1Image.from_bytes(content)
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
    assert image.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(image.dataobj), data)


def test_encode_result_refuses_unknown_extension_or_type() -> None:
    data = np.zeros(SHAPE, dtype=np.uint8)
    reference = nib.Nifti1Image(data, AFFINE)
    with pytest.raises(ValueError, match="result_extension"):
        encode_result(data, reference, ".mha", "uint8")
    with pytest.raises(ValueError, match="result_dtype"):
        encode_result(data, reference, ".nrrd", "complex64")


def test_an_nrrd_written_by_itk_converts_to_the_same_world_grid(tmp_path: Path) -> None:
    """Slicer's ``.nrrd`` uploads: written by ITK here, converted, compared through nibabel."""
    import itk

    # ITK keeps orthonormal directions: a rotation, with spacing, for this direction of travel.
    angle = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    spacing = np.array([0.8, 1.2, 2.5])
    origin = np.array([-40.0, 12.5, 99.0])
    data = np.random.default_rng(1).normal(0, 100, SHAPE).astype(np.int16)
    image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(itk.matrix_from_array(rotation))
    src = tmp_path / "volume.nrrd"
    itk.imwrite(image, str(src))

    dst = tmp_path / "volume.nii.gz"
    nrrd_to_nifti(src, dst)
    converted = nib.load(str(dst))
    assert isinstance(converted, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asarray(converted.dataobj), data)
    for index in [(0, 0, 0), (6, 4, 3), (2, 3, 1)]:
        lps = origin + rotation @ (spacing * np.array(index))
        np.testing.assert_allclose(_lps(converted.affine, index), lps, atol=1e-4)


def test_a_one_layer_segmentation_nrrd_is_read_as_its_labelmap(tmp_path: Path) -> None:
    """A ``.seg.nrrd`` with one layer: a 4D file whose first axis is the (single) layer."""
    import nrrd

    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:4, 1:3, 1] = 1
    directions = np.vstack([np.full(3, np.nan), np.diag([0.5, 0.5, 2.0])])
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,
        "space origin": np.array([1.0, 2.0, 3.0]),
        "kinds": ["list", "domain", "domain", "domain"],
    }
    src = tmp_path / "label.seg.nrrd"
    nrrd.write(str(src), label[np.newaxis], header, index_order="F")
    dst = tmp_path / "label.nii.gz"
    nrrd_to_nifti(src, dst)
    converted = nib.load(str(dst))
    assert isinstance(converted, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asarray(converted.dataobj), label)
    np.testing.assert_allclose(converted.affine[:3, 3], [-1.0, -2.0, 3.0])

    two_layers = tmp_path / "two.seg.nrrd"
    nrrd.write(str(two_layers), np.stack([label, label]), header, index_order="F")
    with pytest.raises(IngestError, match="several layers"):
        nrrd_to_nifti(two_layers, tmp_path / "two.nii.gz")


def test_a_file_that_is_not_nrrd_is_refused_with_a_message(tmp_path: Path) -> None:
    src = tmp_path / "broken.nrrd"
    src.write_bytes(b"NRRD0004\ntype: what\n\n")
    with pytest.raises(IngestError, match="NRRD"):
        nrrd_to_nifti(src, tmp_path / "out.nii.gz")


# -- the viewer-label rule --------------------------------------------------------------------------
def test_painted_slices_are_annotated_and_empty_slices_become_unannotated() -> None:
    label = np.zeros((4, 3, 5), dtype=np.uint8)
    label[1, 1, 2] = 1
    label[0, 0, 4] = 2
    sparse, annotated = sparse_from_viewer(label, axis=2)
    assert annotated == [2, 4]
    assert (sparse[..., [0, 1, 3]] == 255).all()
    # zeros of a painted slice are background, its paint is kept
    assert sparse[1, 1, 2] == 1 and sparse[0, 0, 4] == 2
    assert (sparse[..., 2] == 0).sum() == 11


def test_explicit_255_means_the_label_is_already_sparse() -> None:
    label = np.full((4, 3, 5), 255, dtype=np.uint8)
    label[..., 1] = 0  # a slice annotated as all background
    label[..., 3] = 0
    label[2, 2, 3] = 1
    sparse, annotated = sparse_from_viewer(label, axis=2)
    np.testing.assert_array_equal(sparse, label)
    assert annotated == [1, 3]


def test_annotated_slices_param_marks_an_all_background_slice() -> None:
    label = np.zeros((4, 3, 5), dtype=np.uint8)
    label[0, 0, 2] = 1
    sparse, annotated = sparse_from_viewer(label, axis=2, annotated=[0, 2])
    assert annotated == [0, 2]
    assert (sparse[..., 0] == 0).all() and (sparse[..., [1, 3, 4]] == 255).all()
    full, every = sparse_from_viewer(label, axis=2, annotated="all")
    np.testing.assert_array_equal(full, label)
    assert every == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="outside"):
        sparse_from_viewer(label, axis=2, annotated=[7])


def test_annotation_axis_is_the_largest_spacing_last_on_ties() -> None:
    assert annotation_axis([0.8, 0.8, 3.0]) == 2
    assert annotation_axis([5.0, 1.0, 1.0]) == 0
    assert annotation_axis([1.0, 1.0, 1.0]) == 2


def test_segments_are_mapped_to_classes_by_name() -> None:
    schema = {"1": {"name": "liver", "color": "#e6194b"}}
    label = np.array([[0, 1, 2, 3, 255]], dtype=np.uint8)
    # Slicer numbers segments by their order: here spleen 1, liver 2, background 3
    info = [
        {"name": "spleen", "idx": 1},
        {"name": "Liver", "idx": 2},
        {"name": "background", "idx": 3},
    ]
    mapped, extended = map_segments(label, info, schema)
    np.testing.assert_array_equal(mapped, [[0, 2, 1, 0, 255]])
    assert extended["2"]["name"] == "spleen" and extended["1"]["name"] == "liver"
    assert schema == {"1": {"name": "liver", "color": "#e6194b"}}  # the input is not changed
    with pytest.raises(ValueError, match="idx"):
        map_segments(label, [{"name": "x", "idx": 0}], schema)


def test_annotation_axis_follows_the_painting() -> None:
    """Slices painted along the first axis of an image whose thickest axis is the last."""
    painted = np.zeros((10, 8, 6), dtype=np.uint8)
    painted[2, 1:5, 1:4] = 1
    painted[7, 2:6, 2:5] = 2
    assert annotation_axis([0.8, 0.8, 3.0], painted) == 0
    assert annotation_axis([0.8, 0.8, 3.0], np.zeros_like(painted)) == 2  # nothing painted
