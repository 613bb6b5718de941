"""Synthetic DICOM series for tests: real CT Image Storage files written with pydicom."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["SeriesSpec", "write_series", "zip_files"]


@dataclass(frozen=True)
class SeriesSpec:
    """Geometry and content of a synthetic series.

    Attributes:
        pixels: Z×rows×columns stored values (uint16), slice ``k`` at ``origin + k·step·normal``.
        orientation: ImageOrientationPatient (row direction, column direction; unit vectors).
        origin: ImagePositionPatient of slice 0 (LPS, mm).
        pixel_spacing: PixelSpacing ``(between rows, between columns)`` (mm).
        slice_step: distance between slices along ``row × column`` (mm).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
    """

    pixels: np.ndarray
    orientation: tuple[float, ...]
    origin: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slice_step: float
    slope: float = 1.0
    intercept: float = -1024.0

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        return np.asarray(self.origin) + k * self.slice_step * normal


def write_series(spec: SeriesSpec, folder: Path, series_uid: str | None = None) -> list[Path]:
    """Write one DICOM file per slice of ``spec`` into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    paths = []
    for k, plane in enumerate(spec.pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "synthetic"
        ds.SeriesDescription = "synthetic oblique CT"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in spec.orientation]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in spec.position(k)]
        ds.PixelSpacing = [f"{v:.10g}" for v in spec.pixel_spacing]
        ds.SliceThickness = f"{spec.slice_step:.10g}"
        ds.RescaleSlope = f"{spec.slope:.10g}"
        ds.RescaleIntercept = f"{spec.intercept:.10g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(plane, dtype="<u2").tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_files(files: list[Path], zip_path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Zip ``files`` (under ``series/``) plus ``extra`` members (name → bytes)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, f"series/{path.name}")
        for name, payload in (extra or {}).items():
            archive.writestr(name, payload)
    return zip_path
