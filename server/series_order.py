"""Voxel order of a DICOM series as viewers stack it, and the stored layout of its volume.

The stored NIfTI of a DICOM series (:mod:`segassist.server.dicom`) has voxel ``(x, y, k)`` = pixel
``(row R−1−y, column x)`` of instance ``k`` (instances sorted along the slice normal). A viewer
such as OHIF stacks the same series as ``Z×rows×columns`` frames (columns fastest in memory), and
copies results and labels to and from that buffer as they are. :func:`frames_from_volume` and
:func:`volume_from_frames` convert between the two (``frames[k, r, c] = volume[c, R−1−r, k]``);
:func:`raw_series_label` reads a header-less buffer in the viewer's order (OHIF's ``label.bin``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["frames_from_volume", "raw_series_label", "volume_from_frames"]

_MAGICS = (b"\x1f\x8b", b"PK\x03\x04", b"NRRD")
"""Starts of the self-describing formats a label upload may otherwise be (gzip, zip, NRRD)."""


def frames_from_volume(volume: np.ndarray) -> np.ndarray:
    """``X×Y×Z`` (stored layout) → ``Z×rows×columns`` frames of the series (module docstring)."""
    return np.ascontiguousarray(np.transpose(volume[:, ::-1, :], (2, 1, 0)))


def volume_from_frames(frames: np.ndarray) -> np.ndarray:
    """Inverse of :func:`frames_from_volume`."""
    return np.ascontiguousarray(np.transpose(frames, (2, 1, 0))[:, ::-1, :])


def raw_series_label(path: Path, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The stored-layout ``X×Y×Z`` label in ``path`` if it is a raw buffer of the series' frames.

    A raw buffer has no header: it is recognised by its size, ``X·Y·Z`` bytes (uint8) or twice
    that (little-endian uint16, OHIF's segmentation scalars), and by not starting like a gzip,
    zip or NRRD file. Anything else (a NIfTI or NRRD upload) gives ``None``.
    """
    size = path.stat().st_size
    voxels = int(np.prod(shape))
    with path.open("rb") as handle:
        start = handle.read(4)
    if size not in (voxels, 2 * voxels) or start.startswith(_MAGICS) or _is_nifti(start):
        return None
    dtype = np.uint8 if size == voxels else np.dtype("<u2")
    frames = np.fromfile(path, dtype=dtype).reshape(shape[2], shape[1], shape[0])
    return volume_from_frames(frames)


def _is_nifti(start: bytes) -> bool:
    """A NIfTI-1 or -2 header starts with its size (348 or 540) in either byte order."""
    return len(start) == 4 and any(
        int.from_bytes(start, order) in (348, 540) for order in ("little", "big")
    )
