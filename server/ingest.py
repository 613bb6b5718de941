"""Upload → validated NIfTI on disk.

The upload routes stream a request body into a temporary file, then call one of these pure
functions, which check it and store it atomically (:func:`segassist.models.runtime._atomic.atomic_path`)
as ``.nii.gz``:

- :func:`ingest_nifti`: a ``.nii`` or ``.nii.gz`` volume, stored byte for byte (gzip-compressed if
  it was not), so header, affine, qform/sform and their codes are kept exactly.
- :func:`ingest_dicom_zip`: a zip of one DICOM series, converted the way dcm2niix lays it out
  (see :mod:`segassist.server.dicom`).
- :func:`validate_label`: a label volume for a stored image, stored as ``uint8`` on the image's
  header (``255`` = unannotated).

Every rejection raises :class:`IngestError` with a message the uploader can act on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

from segassist.models.runtime._atomic import atomic_path
from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.nifti import open_nifti

if TYPE_CHECKING:
    from segassist.server.dicom import DicomVolume

__all__ = [
    "MAX_VOLUME_BYTES",
    "IngestError",
    "LabelInfo",
    "VolumeInfo",
    "ingest_dicom_zip",
    "ingest_nifti",
    "store_dicom_volume",
    "validate_label",
]

logger = logging.getLogger(__name__)

MAX_VOLUME_BYTES = 4 * 1024**3
"""Largest decompressed voxel data accepted (guards against gzip bombs and absurd headers)."""

AFFINE_TOLERANCE = 1e-3
"""Largest difference (mm) between a label's affine and its image's still taken as the same grid."""

_CHEAP_CLAIM_BYTES = 64 * 1024**2
"""Voxel data a header may claim before its presence in the file is checked without allocating."""

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_KINDS = {348: (nib.Nifti1Image, b"n+1", 40, "i2"), 540: (nib.Nifti2Image, b"n+2", 16, "i8")}
"""sizeof_hdr → (image class, single-file magic, byte offset of ``dim``, ``dim`` item type)."""


class IngestError(ValueError):
    """An upload was rejected; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class VolumeInfo:
    """What was stored for an image.

    Attributes:
        shape: voxels along the three axes, in the file's voxel order.
        spacing: voxel size (mm) along each axis (norms of the affine's columns).
        affine: 4×4 voxel → RAS+ world (mm) matrix, as nibabel reads the stored file.
        dtype: stored voxel type, e.g. ``"int16"``.
        sha256: hex digest of the stored file.
        size_bytes: size of the stored file.
        axcodes: orientation of the voxel axes, e.g. ``"LAS"`` (nibabel ``aff2axcodes``).
        series_uid: SeriesInstanceUID of a DICOM series (None for NIfTI).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    dtype: str
    sha256: str
    size_bytes: int
    axcodes: str
    series_uid: str | None = None


@dataclass(frozen=True)
class LabelInfo:
    """What was stored for a label volume.

    Attributes:
        sha256: hex digest of the stored file.
        size_bytes: size of the stored file.
        classes_present: label values found among annotated voxels, ascending.
        annotated_slices: for each axis (0, 1, 2), the slice indices holding any voxel ≠ 255.
        annotated_voxels: number of voxels ≠ 255.
    """

    sha256: str
    size_bytes: int
    classes_present: list[int]
    annotated_slices: dict[int, list[int]]
    annotated_voxels: int


@dataclass(frozen=True)
class _Nifti:
    image: nib.Nifti1Image
    data: np.ndarray
    gzipped: bool
    header_bytes: bytes
    """The file's own header bytes, with ``dim[0]`` set to 3 when trailing dims were singletons."""
    squeezed: bool
    """Whether ``header_bytes`` differs from the file's (a 4D+ file with singleton extra dims)."""


def ingest_nifti(src: Path, dst: Path, *, max_bytes: int = MAX_VOLUME_BYTES) -> VolumeInfo:
    """Check that ``src`` is a readable 3D NIfTI volume and store it at ``dst`` (``.nii.gz``).

    The stored file is ``src``'s bytes (gzip-compressed when ``src`` was plain ``.nii``), so the
    header, affine, qform/sform and their codes are exactly the uploaded ones. A 4D (or higher)
    file whose extra dimensions are all 1 is stored as 3D (only ``dim[0]`` changes).

    Args:
        src: the uploaded file, gzip-compressed or not (detected from its bytes, not its name).
        dst: where to store it; must end in ``.nii.gz``.
        max_bytes: largest decompressed voxel data accepted.

    Raises:
        IngestError: not NIfTI, corrupt or truncated, not 3D, unsupported voxel type, or a
            degenerate affine.
    """
    _check_destination(dst)
    nifti = _read_nifti(src, max_bytes, scaled=False)
    with atomic_path(dst) as tmp:
        if nifti.gzipped and not nifti.squeezed:
            shutil.copyfile(src, tmp)
        else:
            _write_gzip_with_header(src, nifti, tmp)
        info = _volume_info(nifti.image, tmp)
    logger.info("stored NIfTI %s %s %s at %s", info.shape, info.dtype, info.axcodes, dst)
    return info


def ingest_dicom_zip(
    src: Path, dst: Path, *, max_bytes: int = MAX_VOLUME_BYTES, headers_dst: Path | None = None
) -> VolumeInfo:
    """Convert a zip of one DICOM series to NIfTI at ``dst`` (``.nii.gz``).

    Slices are sorted along the slice normal and laid out as dcm2niix does (first axis along
    the DICOM rows' direction, second axis against the columns' direction, third along the
    normal), with sform and qform codes 1 (scanner). Voxels are ``RescaleSlope · stored +
    RescaleIntercept`` as int16 when every value is an integer that fits, float32 otherwise.

    Args:
        src: the uploaded zip.
        dst: where to store the volume; must end in ``.nii.gz``.
        max_bytes: largest total uncompressed size of the zip's members.
        headers_dst: where to keep the series' headers in stacking order
            (:mod:`segassist.server.dicom_headers`; the source images of a DICOM-SEG), if given.

    Raises:
        IngestError: not a zip, unsafe member paths, no or several series, inconsistent or
            unevenly spaced slices, undecodable pixel data.
    """
    # pydicom is only needed for DICOM uploads; segassist.server.dicom imports this module.
    from segassist.server.dicom import read_dicom_zip

    _check_destination(dst)
    return store_dicom_volume(read_dicom_zip(src, max_bytes=max_bytes), dst, headers_dst)


def store_dicom_volume(volume: DicomVolume, dst: Path, headers_dst: Path | None) -> VolumeInfo:
    """Store a DICOM series read by :mod:`segassist.server.dicom` as NIfTI at ``dst`` (and its headers at
    ``headers_dst``, if given): shared by zip uploads and series fetched by DICOMweb."""
    from segassist.server.dicom import volume_to_nifti
    from segassist.server.dicom_headers import write_headers

    _check_destination(dst)
    image = volume_to_nifti(volume)
    if headers_dst is not None:
        write_headers(volume.instances, headers_dst)
    with atomic_path(dst) as tmp:
        nib.save(image, tmp)
        # Report the affine as stored (float32 in the header), not the float64 it came from.
        info = _volume_info(open_nifti(tmp), tmp)
    logger.info(
        "stored DICOM series %s (%d slices) as %s %s at %s",
        volume.series_uid,
        info.shape[2],
        info.dtype,
        info.axcodes,
        dst,
    )
    return replace(info, series_uid=volume.series_uid)


def validate_label(
    src: Path,
    dst: Path,
    image_path: Path,
    allowed_values: set[int],
    *,
    max_bytes: int = MAX_VOLUME_BYTES,
) -> LabelInfo:
    """Check a label volume against its stored image and store it as ``uint8`` at ``dst``.

    The label must be a NIfTI on the image's voxel grid (same shape; affine equal within
    :data:`AFFINE_TOLERANCE`), integer-valued (float files with integral values are accepted),
    with values in ``allowed_values`` ∪ {255}. It is stored on a copy of the image's header, so
    its affine, qform/sform and codes are exactly the image's.

    Args:
        src: the uploaded label file (``.nii`` or ``.nii.gz``).
        dst: where to store it; must end in ``.nii.gz``.
        image_path: the stored image (written by :func:`ingest_nifti` or
            :func:`ingest_dicom_zip`).
        allowed_values: the dataset's label schema, background (0) included.
        max_bytes: largest decompressed voxel data accepted.

    Raises:
        IngestError: not NIfTI, corrupt, shape or affine differing from the image's,
            non-integral values, or values outside the schema.
    """
    _check_destination(dst)
    image = open_nifti(image_path)
    nifti = _read_nifti(src, max_bytes, scaled=True)
    label_shape = nifti.image.shape[:3]
    if label_shape != image.shape[:3]:
        raise IngestError(f"label shape {label_shape} differs from image shape {image.shape[:3]}")
    _check_same_grid(np.asarray(nifti.image.affine), np.asarray(image.affine))
    labels = _label_values(nifti.data.reshape(label_shape), allowed_values)

    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    header["cal_min"] = header["cal_max"] = 0
    stored = type(image)(labels, image.affine, header=header)
    annotated = labels != IGNORE_INDEX
    with atomic_path(dst) as tmp:
        nib.save(stored, tmp)
        sha256, size = _digest(tmp)
    counts = np.bincount(labels[annotated], minlength=256)
    info = LabelInfo(
        sha256=sha256,
        size_bytes=size,
        classes_present=[int(v) for v in np.flatnonzero(counts)],
        annotated_slices={
            axis: [int(i) for i in np.flatnonzero(annotated.any(axis=_other_axes(axis)))]
            for axis in range(3)
        },
        annotated_voxels=int(annotated.sum()),
    )
    logger.info(
        "stored label %s: classes %s, %d annotated voxels",
        dst,
        info.classes_present,
        info.annotated_voxels,
    )
    return info


def _check_destination(dst: Path) -> None:
    if not dst.name.endswith(".nii.gz"):
        raise ValueError(f"destination must end in .nii.gz, got {dst}")


def _open(src: Path, gzipped: bool) -> io.BufferedIOBase:
    return gzip.open(src, "rb") if gzipped else src.open("rb")


def _read_nifti(src: Path, max_bytes: int, *, scaled: bool) -> _Nifti:
    """Parse and fully read ``src``; every way it can be broken becomes an :class:`IngestError`."""
    with src.open("rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    try:
        with _open(src, gzipped) as stream:
            header_bytes, byteorder = _header_bytes(stream)
            stream.seek(0)
            image_class, magic, dim_offset, dim_type = _NIFTI_KINDS[len(header_bytes)]
            # nibabel rewrites the magic of a header it reads into a single-file image: check
            # the file's own bytes, or a ``ni1`` header's voxels would be read from offset 0.
            stored = image_class.header_class.from_fileobj(io.BytesIO(header_bytes))
            if bytes(stored["magic"]).rstrip(b"\0") != magic:
                raise IngestError(
                    "file is not a single-file NIfTI volume (its header points to a separate"
                    " .img data file, or is Analyze); upload a .nii or .nii.gz file"
                )
            image = image_class.from_stream(stream)
            _check_header(image, max_bytes)
            _check_data_present(stream, image)
            proxy = cast(ArrayProxy, image.dataobj)
            data = np.asanyarray(proxy) if scaled else proxy.get_unscaled()
            while stream.read(1 << 20):  # reach the end so gzip checks its CRC and length
                pass
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                bad = int(data.size - np.count_nonzero(np.isfinite(data)))
                raise IngestError(
                    f"volume holds {bad} NaN or infinite voxels; replace them before uploading"
                )
    except IngestError:
        raise
    except EOFError as exc:
        raise IngestError(
            "file is not a NIfTI volume: gzip stream is truncated (was the upload complete?)"
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IngestError(f"file is not a NIfTI volume: gzip stream is corrupt ({exc})") from exc
    except OSError as exc:
        raise IngestError(f"file is not a NIfTI volume: voxel data is truncated ({exc})") from exc
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        ValueError,
    ) as exc:
        raise IngestError(f"file is not a NIfTI volume: {exc}") from exc
    patched = _squeezed_header(header_bytes, dim_offset, byteorder + dim_type)
    return _Nifti(image, data, gzipped, patched, squeezed=patched != header_bytes)


def _header_bytes(stream: io.BufferedIOBase) -> tuple[bytes, str]:
    """The fixed-size NIfTI header at the start of ``stream`` and its byte order (``<``/``>``)."""
    start = stream.read(4)
    for code in "<>":
        size = int(np.frombuffer(start, dtype=f"{code}i4")[0]) if len(start) == 4 else 0
        if size in _NIFTI_KINDS:
            header = start + stream.read(size - 4)
            if len(header) < size:
                raise IngestError("file is not a NIfTI volume: header is truncated")
            return header, code
    raise IngestError(
        "file is not a NIfTI volume: it does not start with a NIfTI-1 or NIfTI-2 header"
        " (upload a .nii or .nii.gz file)"
    )


def _check_header(image: nib.Nifti1Image, max_bytes: int) -> None:
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < 3 or any(n < 1 for n in shape):
        raise IngestError(f"volume must be 3D; this file has shape {shape}")
    if any(n != 1 for n in shape[3:]):
        raise IngestError(
            f"volume must be 3D; this file has shape {shape} ({int(np.prod(shape[3:]))} volumes);"
            " upload one volume per file"
        )
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf":
        raise IngestError(f"voxel type {dtype} is not supported; use an integer or float type")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > max_bytes:
        raise IngestError(
            f"volume of shape {shape} holds {nbytes} bytes of voxel data, above the limit of"
            f" {max_bytes}"
        )
    affine = np.asarray(image.affine)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IngestError(
            "volume affine is degenerate (non-finite or zero voxel size); check the header's"
            " sform/qform and pixdim"
        )


def _check_data_present(stream: io.BufferedIOBase, image: nib.Nifti1Image) -> None:
    """Refuse a header that claims more voxel data than the file holds, before allocating it.

    Small claims are read directly (a short file then fails as truncated); a claim above
    :data:`_CHEAP_CLAIM_BYTES` is first checked by streaming through the file in 1 MiB chunks,
    so a 2 GB header on a 1 kB upload costs neither 2 GB of memory nor seconds.
    """
    header = image.header
    claimed = int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if claimed <= _CHEAP_CLAIM_BYTES:
        return
    offset = int(header["vox_offset"])
    stream.seek(offset)
    present = 0
    while present < claimed and (chunk := stream.read(min(1 << 20, claimed - present))):
        present += len(chunk)
    if present < claimed:
        raise IngestError(
            f"file is not a NIfTI volume: its header claims {claimed} bytes of voxel data"
            f" (shape {tuple(header.get_data_shape())}) but the file holds {present};"
            " the upload is truncated or the header is wrong"
        )


def _squeezed_header(header_bytes: bytes, dim_offset: int, dim_type: str) -> bytes:
    """``header_bytes`` with ``dim[0]`` set to 3 (a no-op for files that are already 3D)."""
    patched = bytearray(header_bytes)
    width = np.dtype(dim_type).itemsize
    patched[dim_offset : dim_offset + width] = np.array(3, dtype=dim_type).tobytes()
    return bytes(patched)


def _write_gzip_with_header(src: Path, nifti: _Nifti, tmp: Path) -> None:
    """gzip ``src``'s decompressed bytes into ``tmp``, with the (squeezed) header in front.

    Level 1, nibabel's default: level 6 made a 200 MB upload CPU-bound at ~4 MB/s for a file a
    few percent smaller.
    """
    with _open(src, nifti.gzipped) as stream, gzip.open(tmp, "wb", compresslevel=1) as out:
        stream.seek(len(nifti.header_bytes))
        out.write(nifti.header_bytes)
        shutil.copyfileobj(stream, out, 1 << 20)


def _volume_info(image: Any, stored: Path) -> VolumeInfo:
    affine = np.asarray(image.affine, dtype=np.float64)
    shape = tuple(int(n) for n in image.shape[:3])
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(affine))
    sha256, size = _digest(stored)
    return VolumeInfo(
        shape=(shape[0], shape[1], shape[2]),
        spacing=(spacing[0], spacing[1], spacing[2]),
        affine=[[float(v) for v in row] for row in affine],
        dtype=image.get_data_dtype().name,
        sha256=sha256,
        size_bytes=size,
        axcodes="".join(str(c) for c in nib.aff2axcodes(affine)),
    )


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), path.stat().st_size


def _check_same_grid(label_affine: np.ndarray, image_affine: np.ndarray) -> None:
    difference = np.abs(label_affine - image_affine)
    if difference.max() > AFFINE_TOLERANCE:
        row, col = np.unravel_index(int(difference.argmax()), difference.shape)
        label_codes = "".join(str(c) for c in nib.aff2axcodes(label_affine))
        image_codes = "".join(str(c) for c in nib.aff2axcodes(image_affine))
        raise IngestError(
            f"label affine differs from the image's (by {difference.max():.4g} at row {row},"
            f" column {col}; label orientation {label_codes}, image {image_codes}): the label"
            " must be saved on the image's voxel grid, not resampled or reoriented"
        )


def _label_values(data: np.ndarray, allowed_values: set[int]) -> np.ndarray:
    """``data`` as uint8 after checking it holds only integers in the schema (or 255)."""
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            raise IngestError("label holds NaN or infinite values; labels must be integers")
        fractional = data[data != np.round(data)]
        if fractional.size:
            examples = ", ".join(f"{v:g}" for v in np.unique(fractional)[:5])
            raise IngestError(f"label values must be integers; found {examples}")
    if data.size and (data.min() < 0 or data.max() > IGNORE_INDEX):
        present = {int(v) for v in np.unique(data)}
    else:
        counts = np.bincount(data.astype(np.uint8).ravel(), minlength=256)
        present = {int(v) for v in np.flatnonzero(counts)}
    allowed = set(allowed_values) | {IGNORE_INDEX}
    outside = present - allowed
    if outside:
        raise IngestError(
            f"label values {_format_set(outside)} are not in the dataset's label schema"
            f" {_format_set(set(allowed_values))} ({IGNORE_INDEX} = unannotated)"
        )
    return np.ascontiguousarray(data, dtype=np.uint8)


def _format_set(values: set[int], limit: int = 20) -> str:
    ordered = sorted(values)
    text = ", ".join(str(v) for v in ordered[:limit])
    return "{" + text + (", …" if len(ordered) > limit else "") + "}"


def _other_axes(axis: int) -> tuple[int, int]:
    first, second = (a for a in range(3) if a != axis)
    return first, second
