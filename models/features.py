"""Per-(encoder, image) cache of the decoder maps a few-shot head reads, and heads applied to it.

The interactive path of the assist workflow costs only the head: the encoder runs once over every
slice of a volume and its decoder maps are kept on disk, float16, memory-mapped; fitting a probe
head and applying it to the whole volume then never re-runs the encoder.

Layout of one entry (``<root>/<encoder_id>/<image_id>/``):

- ``map<i>.npy``: ``S×C_i×(Hp/2^i)×(Wp/2^i)`` float16, decoder map ``i`` (fine to coarse, as
  :meth:`segassist.models.networks.unet.DenseUNet.forward_features` returns them) of the ``S`` slices along
  ``axis``, each zero-padded to ``Hp×Wp`` (multiples of the encoder's size divisor) exactly as the
  ONNX runtime pads them, so a head applied here gives what the exported segmenter gives.
- ``clusters.npy``: ``S×H×W`` uint8 argmax of the encoder's cluster head (cropped).
- ``meta.json``: axis, unpadded slice size, channels; written last: an entry without it is
  incomplete and is recomputed. The entry folder is built under a temporary name and renamed.

Coarse maps are stored at their own resolution (a 2^i-fold smaller grid), not upsampled: for the
default channels (16, 32, 64) that is 16 + 32/4 + 64/16 = 28 full-resolution channel equivalents
instead of 112, ~370 MB for 256×256×100. A 1×1 linear head commutes with bilinear upsampling, so
the linear head is applied per map at its own resolution and only the ``L`` logit channels are
upsampled (:func:`apply_head`).

The cache is bounded: :meth:`FeatureCache.evict` removes least recently used entries until the
total size is under ``max_bytes``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder
from segassist.models.runtime._atomic import atomic_dir
from segassist.models.runtime.predictor import Device, providers
from segassist.models.runtime.preprocess import crop_to, pad_to_multiple

__all__ = [
    "FeatureCache",
    "FeatureMaps",
    "FeatureRunner",
    "apply_head",
    "compute_feature_maps",
    "head_input",
    "onnx_runner",
    "torch_runner",
]

logger = logging.getLogger(__name__)

_META = "meta.json"
_FORMAT = 1

SliceProgress = Callable[[int, int], None]
"""Called with (slices done, slices in all) while maps are computed."""

FeatureRunner = Callable[[np.ndarray], list[np.ndarray]]
"""Padded slices ``B×1×Hp×Wp`` → decoder maps (fine to coarse) and the cluster scores of map 0,
as numpy arrays: :func:`torch_runner` or :func:`onnx_runner`."""


def torch_runner(encoder: Encoder) -> FeatureRunner:
    """Run ``encoder`` in PyTorch (eval mode, no gradients) on its device."""
    device = next(encoder.network.parameters()).device
    encoder.eval()

    @torch.inference_mode()
    def run(batch: np.ndarray) -> list[np.ndarray]:
        maps = encoder.network.forward_features(torch.from_numpy(batch).to(device))
        return [m.cpu().numpy() for m in (*maps, encoder.cluster_head(maps[0]))]

    return run


def onnx_runner(path: Path, device: Device = "auto") -> FeatureRunner:
    """Run the ONNX feature extractor at ``path`` (:func:`segassist.models.export.export_feature_extractor`)
    with ONNX Runtime: CUDA when available and asked for, else the CPU."""
    session = ort.InferenceSession(os.fspath(path), providers=providers(device))
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(o) for o in session.run(names, {input_name: batch})]

    return run


@dataclass(frozen=True)
class FeatureMaps:
    """The cached decoder maps of one volume (memory-mapped, read-only).

    Attributes:
        folder: the entry's folder.
        axis: the volume axis the slices were taken along.
        size: unpadded slice size ``(H, W)``.
        maps: decoder maps, ``S×C_i×(Hp/2^i)×(Wp/2^i)`` float16, fine to coarse.
        clusters: ``S×H×W`` uint8 cluster map of the encoder's cluster head.
        entry: random id of this computation of the maps: an entry replaced in the same folder
            has another ("" for entries written before it was recorded).
    """

    folder: Path
    axis: int
    size: tuple[int, int]
    maps: list[np.ndarray]
    clusters: np.ndarray
    entry: str = ""

    @property
    def num_slices(self) -> int:
        """``S``, slices along :attr:`axis`."""
        return int(self.clusters.shape[0])

    @property
    def channels(self) -> list[int]:
        """Channels of each map, fine to coarse."""
        return [int(m.shape[1]) for m in self.maps]

    @classmethod
    def load(cls, folder: Path) -> FeatureMaps:
        """Open a complete entry (raises ``FileNotFoundError`` if incomplete)."""
        meta = json.loads((folder / _META).read_text())
        if meta.get("format") != _FORMAT:
            raise FileNotFoundError(f"{folder}: feature cache format {meta.get('format')}")
        maps = [np.load(folder / f"map{i}.npy", mmap_mode="r") for i in range(meta["num_maps"])]
        clusters = np.load(folder / "clusters.npy", mmap_mode="r")
        size = (int(meta["size"][0]), int(meta["size"][1]))
        return cls(folder, int(meta["axis"]), size, maps, clusters, str(meta.get("entry", "")))


def compute_feature_maps(
    encoder: Encoder,
    volume: np.ndarray,
    axis: int,
    folder: Path,
    batch_size: int = 8,
    progress: SliceProgress | None = None,
    runner: FeatureRunner | None = None,
) -> FeatureMaps:
    """Run ``encoder`` over every slice of ``volume`` and write the entry ``folder`` atomically.

    Args:
        encoder: the encoder (its architecture gives the maps' channels and the size divisor).
        volume: ``X×Y×Z`` float32 normalised to [0, 1] with ``encoder.normalisation``.
        axis: slice axis.
        folder: the entry's final folder (its parent is created; an existing entry is replaced).
        batch_size: slices per forward pass.
        progress: called after every batch.
        runner: how the encoder runs (default :func:`torch_runner`).
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be X×Y×Z, got shape {volume.shape}")
    slices = np.moveaxis(np.asarray(volume, dtype=np.float32), axis, 0)
    count, h, w = slices.shape
    divisor = encoder.size_divisor
    hp, wp = (-(-d // divisor) * divisor for d in (h, w))
    channels = list(encoder.network.channels[:-1])
    run = runner or torch_runner(encoder)
    with atomic_dir(folder) as staging:
        maps = [
            np.lib.format.open_memmap(
                staging / f"map{i}.npy",
                mode="w+",
                dtype=np.float16,
                shape=(count, c, hp >> i, wp >> i),
            )
            for i, c in enumerate(channels)
        ]
        clusters = np.lib.format.open_memmap(
            staging / "clusters.npy", mode="w+", dtype=np.uint8, shape=(count, h, w)
        )
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            batch, _ = pad_to_multiple(np.ascontiguousarray(slices[start:stop, None]), divisor)
            *decoded, scores = run(batch)
            for target, source in zip(maps, decoded, strict=True):
                target[start:stop] = source.astype(np.float16)
            clusters[start:stop] = crop_to(scores, (h, w)).argmax(axis=1)
            if progress is not None:
                progress(stop, count)
        for array in (*maps, clusters):
            array.flush()
        del maps, clusters
        meta = {
            "format": _FORMAT,
            "axis": axis,
            "size": [h, w],
            "padded_size": [hp, wp],
            "num_maps": len(channels),
            "channels": channels,
            "entry": uuid.uuid4().hex,
        }
        (staging / _META).write_text(json.dumps(meta))
    return FeatureMaps.load(folder)


def head_input(
    segmenter: SegmenterNet, features: FeatureMaps, index: Sequence[int]
) -> torch.Tensor:
    """What the segmentation head reads for slices ``index``: ``B×C_head×H×W`` float32 (cropped).

    The same computation as :meth:`SegmenterNet.head_features` on the padded slices (coarse maps
    upsampled bilinearly and concatenated, fine first), then cropped to the slice size.
    """
    idx = np.asarray(index, dtype=np.int64)
    maps = [torch.from_numpy(np.asarray(m[idx], dtype=np.float32)) for m in features.maps]
    if not segmenter.multiscale:
        maps = maps[:1]
        full = maps[0]
    else:
        full = segmenter._head_input(maps)
    h, w = features.size
    return full[:, :, :h, :w]


@torch.inference_mode()
def apply_head(segmenter: SegmenterNet, features: FeatureMaps, start: int, stop: int) -> np.ndarray:
    """Segmentation logits of slices ``start:stop`` from cached maps: ``B×L×H×W`` float32.

    A linear head ``W·concat(m_0, up(m_1), …) + b`` is computed as ``Σ_i up_i(W_i·m_i) + b``
    (``W_i`` the columns of ``W`` reading map ``i``; bilinear upsampling is linear and commutes
    with a 1×1 convolution), so only ``L`` channels are upsampled. Other heads read
    :func:`head_input`.
    """
    h, w = features.size
    head = segmenter.seg_head
    if isinstance(head, torch.nn.Conv2d) and segmenter.multiscale:
        weight = head.weight[:, :, 0, 0]
        parts = torch.split(weight, features.channels, dim=1)
        logits: torch.Tensor | None = None
        for i, (part, stored) in enumerate(zip(parts, features.maps, strict=True)):
            x = torch.from_numpy(np.asarray(stored[start:stop], dtype=np.float32))
            y = torch.einsum("lc,bchw->blhw", part, x)
            if i:
                y = F.interpolate(y, scale_factor=float(2**i), mode="bilinear", align_corners=False)
            logits = y if logits is None else logits + y
        if logits is None:
            raise ValueError("the feature cache holds no maps")
        if head.bias is not None:
            logits = logits + head.bias[None, :, None, None]
        out = logits
        return out[:, :, :h, :w].numpy()
    x = head_input(segmenter, features, range(start, stop))
    return head(x).numpy()


class FeatureCache:
    """Feature entries under ``root/<encoder_id>/<image_id>``, bounded to ``max_bytes``.

    Args:
        root: cache folder (under the data directory).
        max_bytes: total size kept; least recently used entries beyond it are removed.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def folder(self, encoder_id: str, image_id: str) -> Path:
        """The entry folder of ``(encoder_id, image_id)``."""
        return self.root / encoder_id / image_id

    def get(self, encoder_id: str, image_id: str) -> FeatureMaps | None:
        """The complete entry, marked as used now, or ``None``."""
        folder = self.folder(encoder_id, image_id)
        try:
            features = FeatureMaps.load(folder)
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
            return None
        os.utime(folder / _META)
        return features

    def get_or_compute(
        self,
        encoder_id: str,
        image_id: str,
        encoder: Encoder,
        volume: Callable[[], np.ndarray],
        axis: int,
        progress: SliceProgress | None = None,
        runner: FeatureRunner | None = None,
    ) -> FeatureMaps:
        """The entry, computed from ``volume()`` (normalised) if missing or on another axis."""
        cached = self.get(encoder_id, image_id)
        if cached is not None and cached.axis == axis:
            return cached
        began = time.monotonic()
        features = compute_feature_maps(
            encoder,
            volume(),
            axis,
            self.folder(encoder_id, image_id),
            progress=progress,
            runner=runner,
        )
        logger.info(
            "cached features of image %s under encoder %s in %.1f s",
            image_id,
            encoder_id,
            time.monotonic() - began,
        )
        self.evict(keep=features.folder)
        return features

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits ``max_bytes``; returns them."""
        entries = []
        for meta in self.root.glob(f"*/*/{_META}"):
            folder = meta.parent
            size = _folder_bytes(folder)  # its propagation chains included
            entries.append((meta.stat().st_mtime, folder, size))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, folder, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and folder == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            removed.append(folder)
            logger.info("evicted cached features %s (%d MB)", folder, size >> 20)
        return removed


def _folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (those removed meanwhile count 0)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total
