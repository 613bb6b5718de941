"""The propagation's chains of one image, kept on disk for its next propagation.

A chain of :func:`segassist.models.propagation.propagate` starts at a labelled slice ``j`` and
carries its drawn labels outwards, one slice at a time, in one direction, until the next
labelled slice or the volume's end. Each step depends only on the previous step's labels and the
two slices' features, so the chain is a function of (features, ``j``, its drawn labels,
direction, grid, affinity settings) and of nothing else; where it stops only cuts it shorter. When
the annotator corrects one slice and submits again, every chain but those next to that slice is
the same as before or a prefix of it: stored, they are read back instead of computed, and a
longer one resumes from its last stored step. The result is the same to the bit (each step runs
single-threaded, deterministically).

Measured on the service bench's interactive loop (``bench/results/service.md``: a 256×256×100
CT labelled on 3 slices, then one more slice added and resubmitted at once; propagated on
128×128): its predict phase took 1.70–1.87 s instead of 3.39 s, the loop 3.47 s instead of 5.34 s
(medians of 3). The first submission stores its chains: 4.6 s of predict against 4.5 s.

Files: ``<folder>/<key>.npy``, ``S×L×h×w`` float32 (the chain's steps, nearest first), written
atomically; the least recently used are removed beyond :attr:`ChainCache.max_bytes`. A
:class:`~segassist.models.features.FeatureCache` entry keeps its chains in its ``chains``
subfolder (:func:`chains_of`): replacing or evicting the entry removes them with its maps.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segassist.models.runtime._atomic import atomic_path

if TYPE_CHECKING:  # features imports torch; this module needs only numpy
    from segassist.models.features import FeatureMaps

__all__ = ["CHAINS_FOLDER", "DEFAULT_MAX_BYTES", "ChainCache", "chains_of"]

CHAINS_FOLDER = "chains"
"""Subfolder of a feature entry holding its chains."""

DEFAULT_MAX_BYTES = 256 << 20
"""Chains kept per image: a full propagation of a 103×103-pooled 300-slice CT with 5 classes
is about 130 MB of steps."""

_FORMAT = 1  # bump when a step's arithmetic changes: older chains are then never read


class ChainCache:
    """Stored chains of one image's features (one feature source: the caller's).

    Args:
        folder: where the chains are kept (created on the first write).
        max_bytes: total size kept; least recently used chains beyond it are removed, and a
            chain larger than half of it is not stored.
        source: what identifies the features the chains run through (part of every key): a
            chain through other features is never read back.
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES, source: str = "") -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.source = source

    def key(self, start: int, step: int, drawn: np.ndarray, num_classes: int, settings: str) -> str:
        """The name of the chain from slice ``start`` in direction ``step`` (±1) whose start
        slice is ``drawn`` (``H×W``, as the annotator drew it), for ``num_classes`` and the
        grid and affinity ``settings`` (any text that changes with them)."""
        drawn = np.ascontiguousarray(drawn)
        digest = hashlib.sha256()
        header = (
            f"{_FORMAT}|{self.source}|{start}|{step}|{num_classes}|{drawn.shape}|{drawn.dtype}|"
            f"{settings}"
        )
        digest.update(header.encode())
        digest.update(drawn.tobytes())
        return digest.hexdigest()[:32]

    def load(self, key: str) -> np.ndarray | None:
        """The stored steps of chain ``key`` (``S×L×h×w`` float32), marked as used, or None."""
        path = self.folder / f"{key}.npy"
        try:
            steps = np.load(path)
            os.utime(path)
        except (OSError, ValueError):  # missing, being replaced, or unreadable: compute it
            return None
        return steps if steps.dtype == np.float32 and steps.ndim == 4 else None

    def save(self, key: str, steps: np.ndarray) -> None:
        """Store chain ``key`` atomically (unless too large), then keep within ``max_bytes``."""
        if steps.nbytes > self.max_bytes // 2:
            return
        with atomic_path(self.folder / f"{key}.npy") as tmp:
            np.save(tmp, np.ascontiguousarray(steps, dtype=np.float32))
        self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self.folder.glob("*.npy"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def chains_of(features: FeatureMaps) -> ChainCache:
    """The chain cache of a feature entry, for chains through its fine maps
    (:func:`~segassist.models.propagation.map_features`): in its :data:`CHAINS_FOLDER`, keyed
    by the entry's computation (:attr:`~segassist.models.features.FeatureMaps.entry`), so that
    a job still holding replaced maps stores chains the new entry never reads."""
    return ChainCache(features.folder / CHAINS_FOLDER, source=f"{features.entry}|fine")
