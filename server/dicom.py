"""A zip of one DICOM series → a NIfTI volume laid out as dcm2niix lays it out.

Geometry (DICOM PS3.3 C.7.6.2): the pixel in row ``r``, column ``c`` of a slice sits at
``IPP + c·Δc·row_dir + r·Δr·col_dir`` in LPS, where ``IPP`` is ImagePositionPatient,
``row_dir``/``col_dir`` the two ImageOrientationPatient vectors and ``(Δr, Δc)`` PixelSpacing.
Slices are sorted along the normal ``row_dir × col_dir``; the slice step is the mean step between
the first and last ImagePositionPatient, so a gantry tilt shows up as a sheared affine instead of
being lost. Like dcm2niix, the NIfTI's first axis runs along the columns index ``c``, its second
axis along the rows index ``r`` reversed (row ``R−1`` first), its third along the sorted slices;
LPS becomes NIfTI's RAS+ by negating the first two world coordinates.
"""

from __future__ import annotations

import io
import logging
import stat
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from segassist.server.ingest import IngestError

__all__ = ["DicomVolume", "read_dicom_zip", "series_to_volume", "volume_to_nifti"]

logger = logging.getLogger(__name__)

MAX_MEMBERS = 20_000
"""Most files a DICOM zip may hold."""

MAX_EXPANSION_RATIO = 200
"""Largest uncompressed/compressed size of a zip member above :data:`_RATIO_CHECKED_BYTES`:
DICOM slices compress a few times, a zip bomb thousands of times."""
_RATIO_CHECKED_BYTES = 1024**2

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class DicomVolume:
    """One DICOM series as a volume.

    Attributes:
        data: X×Y×Z voxels (X along DICOM columns, Y along rows reversed, Z along the sorted
            slices), rescaled; int16 or float32.
        affine: 4×4 voxel → RAS+ (mm).
        series_uid: SeriesInstanceUID.
        instances: the series' images in stacking order (slice ``k`` of ``data`` is
            ``instances[k]``): the source images of a DICOM-SEG (:mod:`segassist.server.dicom_headers`).
    """

    data: np.ndarray
    affine: np.ndarray
    series_uid: str
    instances: list[Dataset] = field(default_factory=list, repr=False, compare=False)


def read_dicom_zip(src: Path, *, max_bytes: int) -> DicomVolume:
    """Read the single DICOM series held in the zip ``src``.

    Members under ``__MACOSX/``, hidden files, DICOMDIR and files that are not DICOM images are
    skipped; nothing is extracted to disk.

    Args:
        src: the zip file.
        max_bytes: largest total uncompressed size of its members.

    Raises:
        IngestError: see :func:`segassist.server.ingest.ingest_dicom_zip`.
    """
    datasets = _read_images(src, max_bytes)
    series: dict[str, list[Dataset]] = defaultdict(list)
    for dataset in datasets:
        series[str(dataset.get("SeriesInstanceUID", ""))].append(dataset)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid or '<no SeriesInstanceUID>'} {str(group[0].get('SeriesDescription', ''))!r},"
            f" {len(group)} images"
            for uid, group in sorted(series.items(), key=lambda item: -len(item[1]))
        )
        raise IngestError(
            f"DICOM zip holds {len(series)} series ({listing}); upload one series per request"
        )
    return series_to_volume(datasets)


def series_to_volume(datasets: list[Dataset]) -> DicomVolume:
    """Stack the single-frame images of one series into a volume (see the module docstring).

    Raises:
        IngestError: fewer than 2 slices, missing geometry, mixed orientations or sizes,
            repeated or unevenly spaced positions, undecodable pixel data.
    """
    if len(datasets) < 2:
        raise IngestError(
            f"DICOM series has {len(datasets)} image; a volume needs at least 2 slices"
        )
    for dataset in datasets:
        _check_image(dataset)
    first = datasets[0]
    orientation = _floats(first.ImageOrientationPatient, 6)
    pixel_spacing = _floats(first.PixelSpacing, 2)
    rows, columns = int(first.Rows), int(first.Columns)
    for dataset in datasets[1:]:
        if not np.allclose(_floats(dataset.ImageOrientationPatient, 6), orientation, atol=1e-4):
            raise IngestError(
                "DICOM slices have different orientations (ImageOrientationPatient); the series"
                " mixes image planes (e.g. a localizer): upload one stack of parallel slices"
            )
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise IngestError(
                f"DICOM slices have different sizes ({rows}×{columns} and"
                f" {int(dataset.Rows)}×{int(dataset.Columns)}); upload one stack"
            )
        if not np.allclose(_floats(dataset.PixelSpacing, 2), pixel_spacing, atol=1e-4):
            raise IngestError("DICOM slices have different PixelSpacing; upload one stack")

    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_floats(d.ImagePositionPatient, 3) for d in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    step = _slice_step(positions, normal)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = -col_dir * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0] + (rows - 1) * pixel_spacing[0] * col_dir
    data = _stack_pixels(datasets, rows, columns)
    return DicomVolume(
        data=data,
        affine=_LPS_TO_RAS @ lps,
        series_uid=str(first.SeriesInstanceUID),
        instances=datasets,
    )


def volume_to_nifti(volume: DicomVolume) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``volume`` with sform and qform set to its affine, codes 1 (scanner)."""
    image = nib.Nifti1Image(volume.data, volume.affine)
    header = image.header
    header.set_data_dtype(volume.data.dtype)
    header.set_sform(volume.affine, code=1)
    header.set_qform(volume.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return image


def _read_images(src: Path, max_bytes: int) -> list[Dataset]:
    if not zipfile.is_zipfile(src):
        raise IngestError("file is not a zip archive; upload a .zip holding one DICOM series")
    images: list[Dataset] = []
    skipped = 0
    try:
        with zipfile.ZipFile(src) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            _check_members(members, max_bytes)
            for info in members:
                if _ignored(info.filename):
                    skipped += 1
                    continue
                dataset = _parse(info.filename, archive.read(info))
                if dataset is None:
                    skipped += 1
                else:
                    images.append(dataset)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise IngestError(f"zip archive is corrupt: {exc}") from exc
    except NotImplementedError as exc:
        raise IngestError(f"zip uses an unsupported compression method: {exc}") from exc
    if not images:
        raise IngestError(f"zip holds no DICOM images ({skipped} other files)")
    logger.info("read %d DICOM images from %s, skipped %d files", len(images), src, skipped)
    return images


def _check_members(members: list[zipfile.ZipInfo], max_bytes: int) -> None:
    if len(members) > MAX_MEMBERS:
        raise IngestError(f"zip holds {len(members)} files, above the limit of {MAX_MEMBERS}")
    total = sum(info.file_size for info in members)
    if total > max_bytes:
        raise IngestError(
            f"zip expands to {total} bytes, above the limit of {max_bytes}; upload one series"
        )
    for info in members:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
            raise IngestError(
                f"zip member {info.filename!r} has an unsafe path (absolute or with '..');"
                " refusing the archive"
            )
        if info.flag_bits & 0x1:
            raise IngestError("zip is password-protected; upload an unencrypted zip")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IngestError(
                f"zip member {info.filename!r} is a symbolic link; refusing the archive"
            )
        if info.file_size > _RATIO_CHECKED_BYTES and (
            info.file_size > MAX_EXPANSION_RATIO * max(info.compress_size, 1)
        ):
            raise IngestError(
                f"zip member {info.filename!r} expands {info.compress_size} bytes to"
                f" {info.file_size} (over {MAX_EXPANSION_RATIO}:1, a zip bomb?); refusing the"
                " archive"
            )


def _ignored(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return "__MACOSX" in parts or parts[-1].startswith(".") or parts[-1].upper() == "DICOMDIR"


def _parse(name: str, payload: bytes) -> Dataset | None:
    """The DICOM image in ``payload``, or None for files that are not DICOM images."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(payload))
    except InvalidDicomError:
        logger.debug("skipping %s: not DICOM", name)
        return None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise IngestError(f"zip member {name!r} looks like DICOM but is damaged: {exc}") from exc
    if str(dataset.get("SOPClassUID", "")) == _DICOMDIR_SOP_CLASS or "PixelData" not in dataset:
        logger.debug("skipping %s: DICOM without pixel data", name)
        return None
    return dataset


def _check_image(dataset: Dataset) -> None:
    missing = [keyword for keyword in _GEOMETRY if keyword not in dataset]
    if missing:
        raise IngestError(
            f"a DICOM image lacks {', '.join(missing)}; cannot place the slices in space"
        )
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise IngestError(
            "multi-frame DICOM is not supported; export the series as one file per slice"
        )
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise IngestError("colour DICOM images are not supported; upload a greyscale series")


def _floats(value: object, count: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).ravel()
    if array.size != count or not np.all(np.isfinite(array)):
        raise IngestError(f"DICOM geometry attribute has {array.size} values, expected {count}")
    return array


def _slice_step(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Mean step between consecutive ImagePositionPatient; checks the slices are evenly spaced."""
    along = positions @ normal
    gaps = np.diff(along)
    if gaps.min() < 1e-3:
        where = float(along[int(np.argmin(gaps))])
        raise IngestError(
            f"several DICOM images share the slice position {where:.3f} mm (several echoes,"
            " phases or time points in one series?); upload one volume"
        )
    step: np.ndarray = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    worst = float(np.linalg.norm(positions - expected, axis=1).max())
    if worst > 0.1 * float(np.linalg.norm(step)):
        raise IngestError(
            f"DICOM slices are unevenly spaced (gaps from {gaps.min():.3f} to {gaps.max():.3f}"
            " mm); are slices missing from the zip?"
        )
    return step


def _stack_pixels(datasets: list[Dataset], rows: int, columns: int) -> np.ndarray:
    """Rescaled pixels as X×Y×Z, int16 when every value is an integer that fits, else float32."""
    slices = []
    integral = True
    low, high = np.inf, -np.inf
    for dataset in datasets:
        try:
            pixels = dataset.pixel_array
        except Exception as exc:  # decoders raise many types
            syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
            raise IngestError(
                f"cannot decode DICOM pixel data (transfer syntax {syntax}): {exc}"
            ) from exc
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and intercept.is_integer()
        ends = (float(pixels.min()) * slope + intercept, float(pixels.max()) * slope + intercept)
        low, high = min(low, *ends), max(high, *ends)
        slices.append((pixels, slope, intercept))
    fits = integral and low >= _INT16.min and high <= _INT16.max
    volume = np.empty((columns, rows, len(slices)), dtype=np.int16 if fits else np.float32)
    for k, (pixels, slope, intercept) in enumerate(slices):
        values = pixels.astype(np.float64) * slope + intercept
        volume[:, :, k] = values.T[:, ::-1]
    return volume
