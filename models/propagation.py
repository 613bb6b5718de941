"""Label propagation from the annotator's slices through dense feature affinity (Sli2Vol-style).

Sli2Vol (Yeung et al., 2021) and video label propagation (Jabri et al., 2020, "contrastive
random walk") carry a labelled frame's labels to the next frame through the affinity of their
dense features; chained, a few labelled slices label a whole volume. Here the features are the
frozen encoder's cached decoder maps (:class:`segassist.models.features.FeatureMaps`), and one
step carries the class probabilities ``P_s`` (``L×H×W``) of a source slice to an adjacent target
slice (:func:`propagate_step`):

- features ``f`` (``C×H×W``) are centred (the channel means of the slice pair subtracted, so the
  shared offset of ReLU features does not make every pair of pixels alike) and L2-normalised per
  pixel;
- each target pixel ``p`` is compared with the source pixels ``q`` of the ``(2r+1)²`` window
  around it (never a full ``HW×HW`` affinity): ``a(p, q) = f_t(p)·f_s(q)``; windows are cut off
  at the slice edge;
- of those, the :attr:`PropagationConfig.topk` largest are kept and
  ``w(p, q) = softmax_q(a(p, q)/τ)`` over them;
- ``P_t(p) = Σ_q w(p, q)·P_s(q)``: a convex combination, so ``P_t`` stays a distribution.

From every labelled slice ``j`` the labels are chained outwards, slice by slice, in both
directions, up to the next labelled slice (exclusive) or the volume's end (:func:`propagate`).
A slice ``z`` between labelled slices ``a < z < b`` gets both chains, blended by distance:
``P(z) = ((b − z)·P_a(z) + (z − a)·P_b(z)) / (b − a)``; beyond the outermost labelled slice, the
one chain that reaches it.

Drift (each step blurs a little and a wrong match is carried on) is limited by:

- the blend: between two labelled slices the nearer chain weighs more, so no slice relies on
  a chain more than half a gap long for its majority;
- :attr:`PropagationConfig.max_distance`: slices farther than that from every labelled slice
  get no propagated labels (uniform, weight 0); ``None`` (default) propagates through the
  volume, since the features, unlike a copied shape, can end a structure;
- the output floor: ``(1 − FLOOR)·P + FLOOR/L``, so in a product of experts the propagation
  can outvote another expert but never forbids a class (as the slice prior's floor).

Not limited: a target pixel without a true match in its window (background uncovered by a
structure that moved away) takes its best wrong match, and the error is then carried on; on a
textured disc moving over a static background this leaves a trail that lowers Dice by ~0.05 per
slice.

The returned weight ``w(z) ∈ {0, 1}`` marks the slices that got propagated labels (for fusion,
:func:`segassist.models.slice_prior.fuse`). Labelled voxels are returned as drawn (one-hot);
unannotated pixels of a labelled slice count as background (Slicer's rule, as the prior).

Large volumes are propagated on a coarser in-plane grid (:attr:`PropagationConfig.max_voxels`):
the features and the drawn one-hot labels are average-pooled in ``f×f`` blocks (a block's labels
become the shares of its classes), the chains run on the pooled slices, and the probabilities
are upsampled bilinearly back to ``H×W`` (block centres align: ``align_corners=False``); the
labelled slices are returned as drawn, at full resolution. The cost falls by ``f²``; boundaries
are placed to about a block, then the slice prior and the components filter of the assist
(:mod:`segassist.worker.assist`) act at full resolution. A 512×512×300 CT under the 4 M voxel
default is propagated on 103×103 slices (``f = 5``): about the in-plane size of the
benchmark's volumes.

Cost per step: ``(2r+1)²·C·H·W`` multiply-adds for the affinity and ``(2r+1)²·L·H·W`` for the
labels, plus a selection of the ``k``-th largest of ``(2r+1)²`` per pixel; memory
``O(((2r+1)² + C + L)·H·W)`` floats (85 MB of affinities for 512×512, r = 4), kept per chain
and reused from step to step; about two steps per unlabelled slice. Measured on one CPU thread
of a 2-core machine with 16 channels (map 0): 23 ms per step at 128×128 (35–47 ms with
``torch.topk`` and fresh buffers), 0.09–0.12 s at 256×256, 0.7 s at 512×512.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segassist.models.chain_cache import ChainCache
from segassist.models.features import FeatureMaps
from segassist.models.threads import torch_threads
from segassist.models.volumes import IGNORE_INDEX, annotated_slices, class_argmax

__all__ = [
    "FLOOR",
    "Propagation",
    "PropagationConfig",
    "grid_factor",
    "map_features",
    "propagate",
    "propagate_step",
]

FLOOR = 0.01
"""Share of uniform probability mixed into the propagated labels (as the slice prior's)."""

SliceArray = Callable[[int], np.ndarray]
"""Slice index along the annotation axis → that slice's ``C×H×W`` features."""


@dataclass(frozen=True)
class PropagationConfig:
    """Settings of the affinity (module docstring).

    Attributes:
        radius: ``r``, the window ``(2r+1)²`` of source pixels a target pixel attends to; 4
            lets a boundary move up to 4 pixels between adjacent slices.
        topk: affinities kept per target pixel (Jabri et al.'s 10).
        temperature: softmax temperature ``τ`` of the cosine affinity (Jabri et al.'s 0.05).
        max_distance: slices beyond this distance from every labelled slice get nothing
            (``None``: no limit).
        max_voxels: the voxel budget of the propagation grid: a volume of ``S`` slices of
            ``H×W`` is propagated on slices pooled by the smallest integer factor ``f`` with
            ``S·⌈H/f⌉·⌈W/f⌉ ≤ max_voxels`` (:func:`grid_factor`), then brought back to ``H×W``
            (module docstring); ``None``: always at full resolution.
        workers: chains run at once, each in its own thread with single-threaded torch ops
            (``None``: one per CPU core). Two chains start at each labelled slice (down and up)
            and never share a step.
    """

    radius: int = 4
    topk: int = 10
    temperature: float = 0.05
    max_distance: int | None = None
    max_voxels: int | None = None
    workers: int | None = None


@dataclass(frozen=True)
class Propagation:
    """Output of :func:`propagate`.

    Attributes:
        probabilities: ``L×X×Y×Z`` float32 class probabilities (one-hot on labelled voxels,
            uniform where nothing reached).
        weight: ``S`` float32, 1 where labels were propagated or drawn, 0 elsewhere.
        labels: ``X×Y×Z`` uint8 argmax.
    """

    probabilities: np.ndarray
    weight: np.ndarray
    labels: np.ndarray


def map_features(features: FeatureMaps, which: str = "fine") -> SliceArray:
    """Slice ``z``'s features from cached decoder maps: ``C×H×W`` float32 (cropped).

    Args:
        features: the cached maps.
        which: ``"fine"``: map 0 (full resolution); ``"all"``: every map, coarse ones upsampled
            bilinearly and concatenated (what a multiscale head reads).
    """
    if which not in ("fine", "all"):
        raise ValueError(f"unknown features {which!r}: 'fine' or 'all'")
    h, w = features.size
    maps = features.maps if which == "all" else features.maps[:1]

    def get(z: int) -> np.ndarray:
        parts = [torch.from_numpy(np.asarray(maps[0][z : z + 1], dtype=np.float32))]
        for i, stored in enumerate(maps[1:], start=1):
            coarse = torch.from_numpy(np.asarray(stored[z : z + 1], dtype=np.float32))
            parts.append(
                F.interpolate(
                    coarse, scale_factor=float(2**i), mode="bilinear", align_corners=False
                )
            )
        return torch.cat(parts, dim=1)[0, :, :h, :w].numpy()

    return get


def _normalised(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre both ``C×H×W`` maps on the pair's channel means, L2-normalise each pixel (norms
    summed over the channel planes: a reduction along the strided axis 0 is several times
    slower)."""
    mean = (target.mean(dim=(1, 2), keepdim=True) + source.mean(dim=(1, 2), keepdim=True)) / 2
    out = []
    for features in (target, source):
        centred = features - mean
        norm = (centred * centred).sum(dim=0).sqrt_().clamp_min_(1e-6)
        out.append(centred.div_(norm))
    return out[0], out[1]


class _Workspace:
    """The ``K×H×W`` buffers of one chain's steps, reused from step to step: allocated afresh,
    each is new memory the kernel must fault in page by page, which took a third of a
    128×128 step (27.9 vs 35.7 ms with the allocator told to keep freed memory)."""

    def __init__(self, count: int, size: tuple[int, int]) -> None:
        self.affinity = torch.empty(count, *size)
        self.by_pixel = torch.empty(*size, count)  # the affinities, offsets last
        self.weights = torch.empty(count, *size)
        self.below = torch.empty(count, *size, dtype=torch.bool)

    def fits(self, count: int, size: tuple[int, int]) -> bool:
        return tuple(self.affinity.shape) == (count, *size)


def _window_affinity(
    target: torch.Tensor, source: torch.Tensor, radius: int, out: torch.Tensor
) -> torch.Tensor:
    """``a(p, q)`` of each target pixel with the source pixels of its window into ``out``:
    ``K×H×W`` for the ``K = (2r+1)²`` offsets (offset ``o = dx·(2r+1) + dy`` reads source pixel
    ``(x + dx − r, y + dy − r)``), ``−∞`` where that pixel lies outside the slice."""
    r, n = radius, 2 * radius + 1
    h, w = target.shape[1:]
    padded = F.pad(source, (r, r, r, r))
    for dx in range(n):
        for dy in range(n):
            o = dx * n + dy
            torch.sum(target * padded[:, dx : dx + h, dy : dy + w], dim=0, out=out[o])
            if dx < r:
                out[o, : r - dx] = -torch.inf
            if dx > r:
                out[o, h + r - dx :] = -torch.inf
            if dy < r:
                out[o, :, : r - dy] = -torch.inf
            if dy > r:
                out[o, :, w + r - dy :] = -torch.inf
    return out


def _kth_largest(affinity: torch.Tensor, k: int, by_pixel: torch.Tensor) -> torch.Tensor:
    """``H×W``: each pixel's ``k``-th largest of its ``K`` affinities (``K×H×W``), through the
    ``H×W×K`` buffer ``by_pixel`` (a view of it: valid until the buffer is reused).

    NumPy's introselect along a contiguous last axis: 3 ms for 128×128 pixels of 81 where
    ``torch.topk`` over the same took 16–19 ms (one CPU thread).
    """
    count = affinity.shape[0]
    by_pixel.copy_(affinity.permute(1, 2, 0))
    values = by_pixel.numpy()
    values.partition(count - k, axis=-1)
    return torch.from_numpy(values[..., count - k])


@torch.inference_mode()
def propagate_step(
    target: np.ndarray,
    source: np.ndarray,
    labels: np.ndarray,
    config: PropagationConfig,
    workspace: _Workspace | None = None,
) -> np.ndarray:
    """Carry ``labels`` (``L×H×W`` probabilities of the source slice) to the target slice.

    The :attr:`PropagationConfig.topk` largest affinities of a pixel are those at or above its
    ``k``-th largest value (so a tie at that value keeps every tied pixel: in a uniform region
    the window's pixels share the weight equally instead of ``k`` of them chosen arbitrarily).

    Args:
        target: ``C×H×W`` features of the target slice.
        source: ``C×H×W`` features of the source slice.
        labels: ``L×H×W`` class probabilities of the source slice.
        config: window, top-k and temperature.
        workspace: buffers of earlier steps of the same size to reuse (:func:`propagate`'s
            chains); ``None``: new ones.

    Returns:
        ``L×H×W`` float32 probabilities of the target slice (module docstring).
    """
    r, n = config.radius, 2 * config.radius + 1
    t, s = _normalised(torch.from_numpy(target).float(), torch.from_numpy(source).float())
    h, w = t.shape[1:]
    if workspace is None or not workspace.fits(n * n, (h, w)):
        workspace = _Workspace(n * n, (h, w))
    affinity = _window_affinity(t, s, r, workspace.affinity)
    kth = _kth_largest(affinity, min(config.topk, n * n), workspace.by_pixel)
    weights = torch.sub(affinity, affinity.amax(dim=0), out=workspace.weights)
    weights.div_(config.temperature).exp_()
    weights.masked_fill_(torch.lt(affinity, kth, out=workspace.below), 0.0)
    weights /= weights.sum(dim=0)
    p = F.pad(torch.from_numpy(labels).float(), (r, r, r, r))
    out = torch.zeros(p.shape[0], h, w)
    for dx in range(n):
        for dy in range(n):
            out.addcmul_(weights[dx * n + dy], p[:, dx : dx + h, dy : dy + w])
    return out.numpy()


def grid_factor(num_slices: int, size: tuple[int, int], max_voxels: int | None) -> int:
    """The smallest integer ``f ≥ 1`` with ``num_slices·⌈H/f⌉·⌈W/f⌉ ≤ max_voxels`` (1 without
    a budget; at most ``max(H, W)``, one pixel per slice)."""
    h, w = size
    factor = 1
    while (
        max_voxels is not None
        and factor < max(h, w)
        and num_slices * -(-h // factor) * -(-w // factor) > max_voxels
    ):
        factor += 1
    return factor


def _pooled(array: np.ndarray, factor: int) -> np.ndarray:
    """``C×H×W`` → ``C×⌈H/f⌉×⌈W/f⌉`` block means (partial edge blocks: the mean of their
    pixels)."""
    if factor == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.avg_pool2d(tensor, factor, ceil_mode=True)[0].numpy()


def _upsampled(coarse: np.ndarray, factor: int, size: tuple[int, int]) -> np.ndarray:
    """``S×L×h×w`` → ``S×L×H×W``: bilinear by ``factor`` (pixel centres aligned with the
    blocks :func:`_pooled` averaged), cropped to ``size``; a few slices at a time."""
    out = np.empty((*coarse.shape[:2], *size), dtype=np.float32)
    for start in range(0, coarse.shape[0], 8):
        chunk = torch.from_numpy(coarse[start : start + 8])
        fine = F.interpolate(
            chunk, scale_factor=float(factor), mode="bilinear", align_corners=False
        )
        out[start : start + 8] = fine[:, :, : size[0], : size[1]].numpy()
    return out


def _one_hot(drawn: np.ndarray, num_classes: int) -> np.ndarray:
    """``L×H×W`` float32 one-hot of a labelled slice (unannotated pixels: background)."""
    labels = np.where(drawn == IGNORE_INDEX, 0, drawn)
    if labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} ≥ {num_classes} classes")
    return (labels[None] == np.arange(num_classes)[:, None, None]).astype(np.float32)


def _chains(known: Sequence[int], num_slices: int, reach: int) -> list[tuple[int, range, range]]:
    """Per labelled slice ``j``: (j, slices below it, slices above it) its chains reach, nearest
    first; each stops before the next labelled slice and after ``reach`` steps."""
    out = []
    for i, j in enumerate(known):
        low = known[i - 1] + 1 if i else 0
        high = known[i + 1] - 1 if i + 1 < len(known) else num_slices - 1
        out.append(
            (j, range(j - 1, max(low, j - reach) - 1, -1), range(j + 1, min(high, j + reach) + 1))
        )
    return out


def propagate(
    features: SliceArray,
    sparse: np.ndarray,
    axis: int,
    num_classes: int,
    config: PropagationConfig | None = None,
    chains: ChainCache | None = None,
) -> Propagation:
    """Propagate the labelled slices of ``sparse`` through the volume (module docstring).

    Args:
        features: slice index → ``C×H×W`` features of that slice (e.g. :func:`map_features`),
            ``H×W`` the slice's shape (the volume's shape without ``axis``).
        sparse: ``X×Y×Z`` annotator's labels (:data:`IGNORE_INDEX` = unannotated).
        axis: slice axis of the annotation.
        num_classes: ``L``, background included.
        config: settings (defaults: :class:`PropagationConfig`).
        chains: the chains of earlier propagations through the same ``features``, to read back
            and extend (:mod:`segassist.models.chain_cache`; the same result, bit for bit);
            None: compute every chain.

    Returns:
        The propagated probabilities, the per-slice weight, the argmax.

    Raises:
        ValueError: if nothing is labelled or a label value is ``≥ num_classes``.
    """
    with torch_threads(1):  # small per-slice tensors (models/threads.py)
        return _propagate(
            features, sparse, axis, num_classes, config or PropagationConfig(), chains
        )


def _propagate(
    features: SliceArray,
    sparse: np.ndarray,
    axis: int,
    num_classes: int,
    config: PropagationConfig,
    chains: ChainCache | None,
) -> Propagation:
    """:func:`propagate`'s work: the chains in :attr:`PropagationConfig.workers` threads,
    each op on one thread."""
    axis %= 3
    known = annotated_slices(sparse, axis)
    if not known:
        raise ValueError("no labelled slice: nothing to propagate")
    slices = np.moveaxis(sparse, axis, 0)
    count, size = slices.shape[0], (slices.shape[1], slices.shape[2])
    factor = grid_factor(count, size, config.max_voxels)
    grid = (-(-size[0] // factor), -(-size[1] // factor))
    out = np.zeros((count, num_classes, *grid), dtype=np.float32)
    total = np.zeros(count, dtype=np.float32)  # Σ of the blend's shares per slice
    reach = count if config.max_distance is None else config.max_distance
    neighbours = [None, *known, None]
    runs = [
        (j, chain, other)
        for i, (j, below, above) in enumerate(_chains(known, count, reach), start=1)
        for chain, other in ((below, neighbours[i - 1]), (above, neighbours[i + 1]))
        if len(chain)
    ]

    settings = f"{factor}|{grid}|{config.radius}|{config.topk}|{config.temperature}"

    def run(j: int, chain: range, other: int | None) -> list[tuple[int, np.float32, np.ndarray]]:
        """One chain from labelled slice ``j``: (slice, blend share, labels) per step; its
        stored steps read back, the rest computed (and the longer chain stored)."""

        def share(z: int) -> np.float32:  # between labelled slices j and other: (z to other)/gap
            return np.float32(1.0 if other is None else abs(other - z) / abs(other - j))

        key, stored = None, None
        if chains is not None:
            key = chains.key(j, chain.step, slices[j], num_classes, settings)
            stored = chains.load(key)
        if stored is not None and stored.shape[1:] != (num_classes, *grid):
            stored = None
        reusable = [] if stored is None else zip(chain, stored, strict=False)  # the shorter
        steps = [(z, share(z), labels) for z, labels in reusable]
        reused = len(steps)
        if reused == len(chain):
            return steps
        n = 2 * config.radius + 1
        workspace = _Workspace(n * n, grid)
        if reused:  # resume from the last stored step
            labels, source = steps[-1][2], _pooled(features(chain[reused - 1]), factor)
        else:
            labels = _pooled(_one_hot(slices[j], num_classes), factor)
            source = _pooled(features(j), factor)
        for z in chain[reused:]:
            target = _pooled(features(z), factor)
            labels = propagate_step(target, source, labels, config, workspace)
            steps.append((z, share(z), labels))
            source = target  # each slice's features read once per chain
        if chains is not None and key is not None:
            chains.save(key, np.stack([labels for _, _, labels in steps]))
        return steps

    workers = min(config.workers or os.cpu_count() or 1, max(len(runs), 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for steps in pool.map(lambda args: run(*args), runs):
            for z, share, labels in steps:  # ≤ 2 chains per slice: the sum's order is exact
                out[z] += share * labels
                total[z] += share
    reached = total > 0
    out[reached] /= total[reached, None, None, None]
    out[reached] = out[reached] * np.float32(1.0 - FLOOR) + np.float32(FLOOR / num_classes)
    out[~reached] = 1.0 / num_classes
    if factor > 1:
        out = _upsampled(out, factor, size)
    weight = reached.astype(np.float32)
    for j in known:
        out[j], weight[j] = _one_hot(slices[j], num_classes), 1.0
    labels_out = class_argmax(out, axis=1)
    return Propagation(
        np.moveaxis(out, 0, axis + 1),
        weight,
        np.ascontiguousarray(np.moveaxis(labels_out, 0, axis)),
    )
