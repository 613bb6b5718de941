"""Intensity normalisation and padding, in numpy, shared by training and the ONNX runtime.

Training (torch) and inference (ONNX Runtime, no torch) must feed the network identical inputs,
so both call these functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Normalisation", "crop_to", "default_normalisation", "normalise", "pad_to_multiple"]


@dataclass(frozen=True)
class Normalisation:
    """How raw intensities map to the network's input range [0, 1].

    ``kind="ct_window"``: clip Hounsfield units to ``[low, high]`` then scale linearly.
    ``kind="percentile"``: per-volume percentiles ``low``/``high`` (e.g. 0.5 and 99.5) of the
    voxels above the volume's minimum (background excluded), clip, then scale (MR and anything
    without calibrated units).
    """

    kind: Literal["ct_window", "percentile"] = "percentile"
    low: float = 0.5
    high: float = 99.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        return cls(kind=data["kind"], low=float(data["low"]), high=float(data["high"]))


def default_normalisation(modality: str) -> Normalisation:
    """CT: a wide soft-tissue-to-bone window [-1000, 1000] HU; every other modality: percentiles.

    The CT window is a choice (the papers are silent): wide enough to keep lung, soft tissue and
    bone distinguishable for whatever structure a unit annotates.
    """
    if modality.upper() == "CT":
        return Normalisation(kind="ct_window", low=-1000.0, high=1000.0)
    return Normalisation(kind="percentile", low=0.5, high=99.5)


def normalise(volume: np.ndarray, norm: Normalisation) -> np.ndarray:
    """Map raw intensities of a whole volume (any shape) to float32 in [0, 1]."""
    data = np.asarray(volume, dtype=np.float32)
    if norm.kind == "ct_window":
        lo, hi = norm.low, norm.high
    elif norm.kind == "percentile":
        foreground = data[data > data.min()] if data.size else data
        sample = foreground if foreground.size else data.reshape(-1)
        lo, hi = (float(v) for v in np.percentile(sample, [norm.low, norm.high]))
    else:
        raise ValueError(f"unknown normalisation kind {norm.kind!r}")
    if not hi > lo:
        return np.zeros_like(data)
    out = (np.clip(data, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)


def pad_to_multiple(batch: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad the last two axes of ``batch`` (…×H×W) up to multiples of ``multiple``.

    Returns the padded array and the original ``(H, W)`` for :func:`crop_to`.
    """
    h, w = batch.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return batch, (h, w)
    pad = [(0, 0)] * (batch.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(batch, pad, mode="constant"), (h, w)


def crop_to(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Undo :func:`pad_to_multiple`: keep the first ``size = (H, W)`` of the last two axes."""
    h, w = size
    return batch[..., :h, :w]
