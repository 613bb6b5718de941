"""Uploads become validated NIfTI files whose geometry is exactly the uploaded (or DICOM) one."""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segassist.server.ingest import IngestError, ingest_dicom_zip, ingest_nifti, validate_label
from tests.conftest import TOTALSEG_DICOM, TOTALSEG_LIVER, TOTALSEG_SEG
from tests.server.dicom_factory import SeriesSpec, write_series, zip_files

OBLIQUE = np.array(
    [
        [0.70, -0.35, 0.10, -12.5],
        [0.40, 0.80, -0.25, 30.25],
        [-0.05, 0.30, 2.40, -80.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
LPS = np.array(
    [[-0.8, 0, 0, 90.0], [0, -0.8, 0, 110.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]], dtype=float
)
RAS = np.array([[1.5, 0, 0, -40.0], [0, 1.5, 0, -50.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])


def _load(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image):
        raise TypeError(f"{path} is not NIfTI")
    return image


def _nifti(
    data: np.ndarray, affine: np.ndarray, qform: np.ndarray | None = None
) -> nib.Nifti1Image:
    """An image with sform = ``affine`` (code 4) and qform = ``qform`` or ``affine`` (code 1)."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_sform(affine, code=4)
    image.header.set_qform(affine if qform is None else qform, code=1)
    return image


def _same_geometry(a: Path, b: Path) -> bool:
    """Same affine, sform, qform and codes, bit for bit."""
    first, second = _load(a), _load(b)
    sform_a, scode_a = first.header.get_sform(coded=True)
    sform_b, scode_b = second.header.get_sform(coded=True)
    qform_a, qcode_a = first.header.get_qform(coded=True)
    qform_b, qcode_b = second.header.get_qform(coded=True)
    return (
        np.array_equal(first.affine, second.affine)
        and np.array_equal(sform_a, sform_b)
        and np.array_equal(qform_a, qform_b)
        and (scode_a, qcode_a) == (scode_b, qcode_b)
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("affine", [OBLIQUE, LPS, RAS], ids=["oblique", "lps", "ras"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_is_stored_with_exact_header_and_data(
    tmp_path: Path, affine: np.ndarray, suffix: str
) -> None:
    data = np.random.default_rng(0).integers(-1000, 1000, (6, 5, 4)).astype(np.int16)
    # A qform cannot hold a shear, so it differs from the sform for the oblique affine.
    image = _nifti(data, affine, qform=np.diag([0.9, 0.9, 2.5, 1.0]))
    src = tmp_path / f"upload{suffix}"
    nib.save(image, src)
    dst = tmp_path / "store" / "image.nii.gz"

    info = ingest_nifti(src, dst)

    assert _same_geometry(src, dst)
    assert np.array_equal(_load(dst).affine, affine.astype(np.float32))
    assert np.array_equal(np.asanyarray(_load(dst).dataobj), data)
    stored = gzip.decompress(dst.read_bytes())
    assert stored == (
        gzip.decompress(src.read_bytes()) if suffix == ".nii.gz" else src.read_bytes()
    )
    assert info.shape == (6, 5, 4)
    assert info.dtype == "int16"
    assert np.allclose(info.affine, affine, atol=1e-5)
    assert info.sha256 == _sha256(dst)
    assert info.size_bytes == dst.stat().st_size
    assert info.axcodes == "".join(nib.aff2axcodes(affine))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["image.nii.gz"]


def test_gzipped_nifti_is_stored_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "upload.nii.gz"
    nib.save(_nifti(np.zeros((3, 3, 3), np.float32), OBLIQUE), src)

    info = ingest_nifti(src, tmp_path / "image.nii.gz")

    assert info.sha256 == _sha256(src)


def test_single_frame_4d_nifti_is_stored_as_3d_and_a_series_is_rejected(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    src = tmp_path / "frame.nii.gz"
    nib.save(_nifti(data, LPS), src)
    dst = tmp_path / "image.nii.gz"

    info = ingest_nifti(src, dst)

    assert info.shape == (4, 5, 6)
    assert _load(dst).shape == (4, 5, 6)
    assert np.array_equal(_load(dst).get_fdata(), data[..., 0])
    assert _same_geometry(src, dst)

    series = tmp_path / "series.nii.gz"
    nib.save(_nifti(np.zeros((4, 5, 6, 3), np.float32), LPS), series)
    with pytest.raises(IngestError, match=r"must be 3D; this file has shape \(4, 5, 6, 3\)"):
        ingest_nifti(series, tmp_path / "other.nii.gz")


def _png_bytes() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(1).integers(0, 256, 400, np.uint8))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_png_bytes(), "not a NIfTI volume: it does not start with a NIfTI"),
        (gzip.compress(b"just some text, not a volume" * 20), "not a NIfTI volume"),
        (b"", "not a NIfTI volume"),
    ],
    ids=["png", "gzipped-text", "empty"],
)
def test_files_that_are_not_nifti_are_rejected(
    tmp_path: Path, payload: bytes, message: str
) -> None:
    src = tmp_path / "scan.nii.gz"
    src.write_bytes(payload)
    dst = tmp_path / "store" / "image.nii.gz"

    with pytest.raises(IngestError, match=message):
        ingest_nifti(src, dst)

    assert not dst.exists()


def test_damaged_uploads_are_rejected_without_storing_anything(tmp_path: Path) -> None:
    data = np.random.default_rng(2).normal(size=(20, 20, 20)).astype(np.float32)
    good = tmp_path / "good.nii.gz"
    nib.save(_nifti(data, RAS), good)
    payload = good.read_bytes()
    store = tmp_path / "store"
    store.mkdir()

    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(IngestError, match="gzip stream is truncated"):
        ingest_nifti(truncated, store / "a.nii.gz")

    corrupt = tmp_path / "corrupt.nii.gz"  # intact header and voxels, wrong CRC-32 in the trailer
    corrupt.write_bytes(payload[:-8] + bytes(b ^ 0xFF for b in payload[-8:-4]) + payload[-4:])
    with pytest.raises(IngestError, match="gzip stream is corrupt"):
        ingest_nifti(corrupt, store / "b.nii.gz")

    plain = tmp_path / "short.nii"
    nib.save(_nifti(data, RAS), plain)
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(IngestError, match="voxel data is truncated"):
        ingest_nifti(plain, store / "c.nii.gz")

    assert list(store.iterdir()) == []


def _stored_image(tmp_path: Path, affine: np.ndarray, shape: tuple[int, int, int]) -> Path:
    src = tmp_path / "image-upload.nii.gz"
    nib.save(_nifti(np.zeros(shape, np.int16), affine, qform=np.diag([0.9, 0.9, 2.5, 1.0])), src)
    image_path = tmp_path / "images" / "image.nii.gz"
    ingest_nifti(src, image_path)
    return image_path


def test_sparse_label_is_stored_as_uint8_on_the_image_grid(tmp_path: Path) -> None:
    image_path = _stored_image(tmp_path, OBLIQUE, (10, 10, 6))
    labels = np.full((10, 10, 6), 255, dtype=np.float32)  # a float file with integral values
    labels[:, :, 2] = 0
    labels[3:6, 3:6, 2] = 1
    labels[:, :, 4] = 0
    labels[1:4, 1:4, 4] = 2
    src = tmp_path / "label-upload.nii"
    # Re-derived affine from a viewer: the same grid, up to float32 rounding.
    nib.save(nib.Nifti1Image(labels, OBLIQUE.astype(np.float32).astype(np.float64) + 1e-6), src)
    dst = tmp_path / "labels" / "v1.nii.gz"

    info = validate_label(src, dst, image_path, allowed_values={0, 1, 2})

    stored = _load(dst)
    assert stored.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(stored.dataobj), labels.astype(np.uint8))
    assert _same_geometry(dst, image_path)
    assert info.classes_present == [0, 1, 2]
    assert info.annotated_slices == {0: list(range(10)), 1: list(range(10)), 2: [2, 4]}
    assert info.annotated_voxels == 200
    assert info.sha256 == _sha256(dst)
    assert info.size_bytes == dst.stat().st_size


def test_labels_that_do_not_fit_the_image_or_schema_are_rejected(tmp_path: Path) -> None:
    image_path = _stored_image(tmp_path, LPS, (10, 10, 6))
    dst = tmp_path / "labels" / "v1.nii.gz"

    def upload(data: np.ndarray, affine: np.ndarray = LPS) -> Path:
        path = tmp_path / f"label{len(list(tmp_path.glob('label*')))}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        return path

    cases = [
        (
            upload(np.zeros((10, 10, 5), np.uint8)),
            r"label shape \(10, 10, 5\) differs from image shape \(10, 10, 6\)",
        ),
        (
            upload(np.array([0, 1, 7, 9, 255] * 120, np.int16).reshape(10, 10, 6)),
            r"label values \{7, 9\} are not in the dataset's label schema \{0, 1, 2\} \(255 = unannotated\)",
        ),
        (upload(np.full((10, 10, 6), -1, np.int16)), r"label values \{-1\}"),
        (upload(np.full((10, 10, 6), 0.5, np.float32)), "label values must be integers; found 0.5"),
        (upload(np.zeros((10, 10, 6), np.uint8), RAS), "label affine differs from the image's"),
    ]
    for src, message in cases:
        with pytest.raises(IngestError, match=message):
            validate_label(src, dst, image_path, allowed_values={0, 1, 2})
    assert not dst.exists()


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_spec(slices: int = 5, rows: int = 7, columns: int = 6) -> SeriesSpec:
    rotation = _rotation(0.3, -0.2, 0.5)
    pixels = np.random.default_rng(3).integers(0, 3000, (slices, rows, columns)).astype(np.uint16)
    orientation = tuple(float(v) for v in np.concatenate([rotation[:, 0], rotation[:, 1]]))
    return SeriesSpec(
        pixels=pixels,
        orientation=orientation,
        origin=(-120.5, 80.25, 33.0),
        pixel_spacing=(0.7, 0.9),
        slice_step=2.5,
    )


def test_oblique_dicom_series_gets_the_dcm2niix_affine_and_voxel_order(tmp_path: Path) -> None:
    spec = _oblique_spec()
    files = write_series(spec, tmp_path / "dicom")
    junk = {"DICOMDIR": b"not parsed", "__MACOSX/._IM0000.dcm": b"\0" * 64, "README.txt": b"hi"}
    in_order = zip_files(files, tmp_path / "ordered.zip", extra=junk)
    shuffled = zip_files([files[i] for i in (3, 0, 4, 2, 1)], tmp_path / "shuffled.zip")
    dst = tmp_path / "store" / "image.nii.gz"

    info = ingest_dicom_zip(in_order, dst)

    row, col = np.array(spec.orientation[:3]), np.array(spec.orientation[3:])
    normal = np.cross(row, col)
    rows = spec.pixels.shape[1]
    d_row, d_col = spec.pixel_spacing
    # dcm2niix: i along the row direction, j against the column direction (last row first),
    # k along the normal; LPS → RAS negates x and y.
    lps = np.eye(4)
    lps[:3, :3] = np.column_stack([row * d_col, -col * d_row, normal * spec.slice_step])
    lps[:3, 3] = np.asarray(spec.origin) + (rows - 1) * d_row * col
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image = _load(dst)
    assert np.allclose(image.affine, expected, atol=1e-4)
    assert np.allclose(info.affine, expected, atol=1e-4)
    assert image.header.get_sform(coded=True)[1] == 1
    assert image.header.get_qform(coded=True)[1] == 1
    assert np.allclose(image.header.get_qform(), expected, atol=1e-4)
    assert info.shape == (6, 7, 5)
    assert info.dtype == "int16"
    assert np.allclose(info.spacing, (0.9, 0.7, 2.5))

    # Every DICOM pixel lands on the voxel whose world position is the pixel's.
    volume = np.asanyarray(image.dataobj)
    world_to_voxel = np.linalg.inv(image.affine)
    for k, r, c in [(0, 0, 0), (4, 6, 5), (2, 3, 1), (1, 5, 4)]:
        lps_point = spec.position(k) + c * d_col * row + r * d_row * col
        ras_point = np.array([-lps_point[0], -lps_point[1], lps_point[2], 1.0])
        voxel = world_to_voxel @ ras_point
        index = tuple(int(v) for v in np.round(voxel[:3]))
        assert np.allclose(voxel[:3], index, atol=1e-3)
        assert volume[index] == int(spec.pixels[k, r, c]) + spec.intercept

    other = tmp_path / "store" / "shuffled.nii.gz"
    ingest_dicom_zip(shuffled, other)
    assert np.array_equal(np.asanyarray(_load(other).dataobj), volume)
    assert np.array_equal(_load(other).affine, image.affine)


def test_dicom_zips_that_are_not_one_clean_series_are_rejected(tmp_path: Path) -> None:
    spec = _oblique_spec(slices=3, rows=4, columns=4)
    first = write_series(spec, tmp_path / "a", series_uid="1.2.826.0.1.3680043.8.498.1")
    second = write_series(spec, tmp_path / "b", series_uid="1.2.826.0.1.3680043.8.498.2")
    rng = np.random.default_rng(4)
    dst = tmp_path / "store" / "image.nii.gz"

    two_series = tmp_path / "two.zip"
    with zipfile.ZipFile(two_series, "w") as archive:
        for path in first + second:
            archive.write(path, f"{path.parent.name}/{path.name}")
    garbage = zip_files(
        [], tmp_path / "garbage.zip", extra={f"f{i}.dcm": rng.bytes(300) for i in range(3)}
    )
    traversal = zip_files(first, tmp_path / "evil.zip", extra={"../../etc/cron.d/x": b"boom"})
    missing_slice = tmp_path / "gap.zip"
    gap_spec = _oblique_spec(slices=5, rows=4, columns=4)
    gap_files = write_series(gap_spec, tmp_path / "gap")
    zip_files([gap_files[i] for i in (0, 1, 3, 4)], missing_slice)
    not_a_zip = tmp_path / "scan.zip"
    not_a_zip.write_bytes(rng.bytes(1000))

    cases = [
        (
            two_series,
            r"DICOM zip holds 2 series \(1\.2\.826\.0\.1\.3680043\.8\.498\.1 .*3 images; "
            r"1\.2\.826\.0\.1\.3680043\.8\.498\.2 .*\); upload one series per request",
        ),
        (garbage, r"zip holds no DICOM images \(3 other files\)"),
        (traversal, "unsafe path"),
        (missing_slice, "unevenly spaced.*missing"),
        (not_a_zip, "not a zip archive"),
    ]
    for src, message in cases:
        with pytest.raises(IngestError, match=message):
            ingest_dicom_zip(src, dst)
    assert not dst.exists()


def test_real_ct_series_matches_totalsegmentators_dcm2niix_grid(
    tmp_path: Path, totalseg: Path
) -> None:
    """TotalSegmentator converted this series with dcm2niix and segmented the result; our
    conversion must land on the same grid so that segmentation is a valid label for it."""
    files = [totalseg / member for member in TOTALSEG_DICOM]
    upload = zip_files(files, tmp_path / "ct.zip")
    image_path = tmp_path / "images" / "image.nii.gz"

    info = ingest_dicom_zip(upload, image_path)

    reference = _load(totalseg / TOTALSEG_SEG)
    assert info.shape == reference.shape == (512, 512, 20)
    assert np.allclose(info.affine, reference.affine, atol=1e-4)
    assert info.axcodes == "LAS"
    assert info.dtype == "int16"

    labels = validate_label(
        totalseg / TOTALSEG_SEG,
        tmp_path / "labels" / "v1.nii.gz",
        image_path,
        allowed_values=set(range(118)),
    )
    assert TOTALSEG_LIVER in labels.classes_present
    # Voxel order, not just the affine: the liver mask covers homogeneous enhanced parenchyma
    # (flipping any axis scatters it over air, fat and bone: std > 90 HU).
    hu = np.asanyarray(_load(image_path).dataobj)
    liver = hu[np.asanyarray(reference.dataobj) == TOTALSEG_LIVER]
    assert 50 < liver.mean() < 150
    assert liver.std() < 40
