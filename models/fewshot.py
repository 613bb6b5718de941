"""Few-shot segmentation from sparse labels on top of a (pretrained or random) encoder.

Three methods, and ``"auto"`` choosing among them (:mod:`segassist.models.method_selection`) (METHODS.md, "Downstream"):

- ``"linear"``: linear probe. The encoder is frozen; the head features of the annotated slices
  are computed once, the annotated pixels gathered, and only the segmentation head trains on them
  (Dice + cross-entropy). Seconds on a CPU: the interactive path.
- ``"finetune"``: encoder and head train together (encoder lr ≪ head lr) on augmented
  annotated slices, with early stopping on held-out labelled pixels.
- ``"mean_teacher"``: ``"finetune"`` plus a consistency loss between the student and an EMA
  teacher on the unannotated slices of the same volumes (Tarvainen & Valpola, 2017). Early
  stopping evaluates both; the weights (teacher's or student's) with the lowest held-out loss are
  returned (the teacher's final weights when nothing is held out).

Training slices are the annotated ones (any voxel ≠ 255 along ``axis``) at native resolution,
zero-padded (labels: ignore) to a common size that is a multiple of the encoder's
``size_divisor``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
)
from torch import nn

from segassist.models.features import FeatureMaps, head_input
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder
from segassist.models.progress import Progress, ProgressCallback
from segassist.models.runtime.configs import METHODS, PROBE_HEADS, FewShotConfig, Method, ProbeHead
from segassist.models.segloss import MaskedDiceCELoss
from segassist.models.threads import torch_threads
from segassist.models.volumes import IGNORE_INDEX, SparseLabels, annotated_slices

__all__ = [
    "METHODS",
    "PROBE_HEADS",
    "FewShotConfig",
    "HeadChoice",
    "Method",
    "fit_probe",
    "fit_segmenter",
    "network_pool",
    "select_probe_head",
]

logger = logging.getLogger(__name__)


@dataclass
class _TrainingSlices:
    """Slices at a common padded size ``H×W`` (a multiple of the encoder's size divisor)."""

    images: np.ndarray  # S×H×W float32, zero-padded
    labels: np.ndarray  # S×H×W uint8, IGNORE_INDEX where unannotated or padded
    unlabelled: np.ndarray  # U×H×W float32: non-constant slices without any annotation


def _pad_to(array: np.ndarray, h: int, w: int, value: float) -> np.ndarray:
    pad = [(0, 0)] * (array.ndim - 2) + [(0, h - array.shape[-2]), (0, w - array.shape[-1])]
    return np.pad(array, pad, mode="constant", constant_values=value)


def _collect(
    images: list[np.ndarray],
    labels: list[np.ndarray],
    num_classes: int,
    axis: int,
    size_divisor: int,
) -> _TrainingSlices:
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label volumes")
    if not images:
        raise ValueError("no images to train on")
    per_volume = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if image.ndim != 3:
            raise ValueError(f"image {i} must be 3D (X×Y×Z), got shape {image.shape}")
        sparse = SparseLabels(np.asarray(label))
        try:
            sparse.check(num_classes, shape=image.shape)
        except ValueError as err:
            raise ValueError(f"label volume {i}: {err}") from err
        annotated = annotated_slices(sparse.labels, axis)
        image_slices = np.moveaxis(np.asarray(image, dtype=np.float32), axis, 0)
        label_slices = np.moveaxis(sparse.labels.astype(np.uint8), axis, 0)
        mask = np.zeros(len(image_slices), dtype=bool)
        mask[annotated] = True
        varying = np.ptp(image_slices.reshape(len(image_slices), -1), axis=1) > 0
        per_volume.append((image_slices[mask], label_slices[mask], image_slices[~mask & varying]))
    if not any(len(lab) for _, lab, _ in per_volume):
        raise ValueError(
            f"no slice is annotated along axis {axis}: every label voxel is {IGNORE_INDEX}"
        )
    h = max(img.shape[1] for img, _, _ in per_volume)
    w = max(img.shape[2] for img, _, _ in per_volume)
    h, w = (-(-d // size_divisor) * size_divisor for d in (h, w))
    return _TrainingSlices(
        images=np.concatenate([_pad_to(img, h, w, 0.0) for img, _, _ in per_volume]),
        labels=np.concatenate([_pad_to(lab, h, w, IGNORE_INDEX) for _, lab, _ in per_volume]),
        unlabelled=np.concatenate([_pad_to(u, h, w, 0.0) for _, _, u in per_volume]),
    )


def _split_holdout(
    labels: np.ndarray, fraction: float, tile: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Split labels into (train, held-out) by tiles; held-out is None if it would be empty."""
    if fraction == 0:
        return labels, None
    rng = np.random.default_rng(seed)
    s, h, w = labels.shape
    tiles = rng.random((s, -(-h // tile), -(-w // tile))) < fraction
    held = np.repeat(np.repeat(tiles, tile, axis=1), tile, axis=2)[:, :h, :w]
    annotated = labels != IGNORE_INDEX
    if not (held & annotated).any() or not (~held & annotated).any():
        return labels, None
    train = np.where(held, IGNORE_INDEX, labels).astype(np.uint8)
    holdout = np.where(held, labels, IGNORE_INDEX).astype(np.uint8)
    return train, holdout


def _augmenter(config: FewShotConfig, h: int, w: int) -> Compose:
    """Random affine (image and labels alike) and intensity changes, on ``1×H×W`` slices."""
    rotate = math.radians(config.rotate_degrees)
    shift = (config.translate_fraction * h, config.translate_fraction * w)
    transforms = Compose(
        [
            RandAffined(
                keys=["image", "label"],
                prob=config.aug_prob,
                rotate_range=rotate,
                scale_range=(config.scale_range, config.scale_range),
                translate_range=shift,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.03),
        ]
    )
    transforms.set_random_state(seed=config.seed)
    return transforms


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean Teacher's input perturbation: Gaussian noise σ 0.03 and a random gamma."""
    gamma = torch.exp(torch.empty(x.shape[0], 1, 1, 1).uniform_(-0.2, 0.2, generator=generator))
    noisy = x.clamp(0, 1) ** gamma.to(x.device)
    return noisy + 0.03 * torch.randn(x.shape, generator=generator).to(x.device)


def network_pool(
    encoder: Encoder, method: str, slice_shape: tuple[int, ...], config: FewShotConfig
) -> int:
    """In-plane pooling ``p`` of the network ``method`` trains on ``encoder`` for slices of
    ``slice_shape`` (``SegmenterNet.pool``): ``⌈max(H, W) / config.scratch_max_side⌉`` for
    ``"finetune"`` / ``"mean_teacher"`` from a random initialisation, 1 otherwise (a pretrained
    encoder keeps the pixel scale it learnt; a probe reads the encoder's native maps)."""
    if method not in ("finetune", "mean_teacher") or encoder.objective != "random":
        return 1
    if config.scratch_max_side == 0 or not slice_shape:
        return 1
    return -(-max(slice_shape) // config.scratch_max_side)


def _in_plane_shape(images: list[np.ndarray], axis: int) -> tuple[int, ...]:
    """The largest in-plane sides of the volumes' slices along ``axis`` (empty if none is 3D)."""
    shapes = [np.delete(np.array(image.shape), axis) for image in images if image.ndim == 3]
    return tuple(int(d) for d in np.max(shapes, axis=0)) if shapes else ()


def fit_segmenter(
    encoder: Encoder,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    num_classes: int,
    method: Method = "linear",
    config: FewShotConfig | None = None,
    progress: ProgressCallback | None = None,
) -> SegmenterNet:
    """Train a segmenter from sparse labels.

    Args:
        encoder: the encoder to start from (not modified: it is copied).
        images: ``X×Y×Z`` volumes normalised to [0, 1] with ``encoder.normalisation``.
        labels: ``X×Y×Z`` label volumes, same shapes, ``0…num_classes−1`` or 255 (unannotated).
        num_classes: L, background included.
        method: ``"linear"``, ``"finetune"``, ``"mean_teacher"`` or ``"auto"`` (the winner of
            :func:`segassist.models.method_selection.select_method` within
            ``config.auto_budget_seconds``: probes on ``encoder``, fine-tuning it, and scratch from
            ``Encoder.random`` of its config; an encoder that is itself random has only scratch).
        config: settings (defaults: :class:`FewShotConfig`); ``head="auto"`` with ``"linear"``
            picks the head as :func:`select_probe_head` does (held-out tiles of the slices).
        progress: called after every step with ``Progress(step, total, loss, eta, method)``;
            an exception it raises propagates (few-shot runs are short and not checkpointed).

    Returns:
        The segmenter (eval mode, CPU), its ``cluster_head`` a copy of the encoder's.

    Raises:
        ValueError: on an unknown method, mismatched shapes, label values ≥ ``num_classes``
            (other than 255), or when no slice is annotated.
    """
    config = config or FewShotConfig()
    if method not in METHODS:
        raise ValueError(f"unknown few-shot method {method!r}; expected one of {METHODS}")
    if method == "auto":
        from segassist.models.method_selection import select_method  # it imports this module

        pretrained = None if encoder.objective == "random" else encoder
        scratch = Encoder.random(encoder.config, encoder.normalisation) if pretrained else encoder
        choice = select_method(
            pretrained, scratch, images, labels, num_classes, config, None, progress
        )
        return choice.segmenter
    axis = encoder.config.axis if config.axis is None else config.axis
    pool = network_pool(encoder, method, _in_plane_shape(images, axis), config)
    data = _collect(images, labels, num_classes, axis, encoder.size_divisor * pool)
    logger.info(
        "few-shot %s: %d annotated slices, %d unlabelled, size %s, pooled %d×",
        method,
        len(data.images),
        len(data.unlabelled),
        data.images.shape[1:],
        pool,
    )
    if config.head == "auto":
        head: ProbeHead = "linear"
        if method == "linear":
            head = _select_head_on_slices(encoder, data, num_classes, config).head
        config = config.model_copy(update={"head": head})
    segmenter = _new_segmenter(encoder, num_classes, config, pool)
    segmenter.cluster_head.requires_grad_(False)
    device = torch.device(config.device)
    segmenter.to(device)
    if method == "linear":
        _fit_linear(segmenter, data, config, device, progress)
    else:
        segmenter = _fit_finetune(segmenter, data, config, device, method, progress)
    return segmenter.cpu().eval()


def _new_segmenter(
    encoder: Encoder, num_classes: int, config: FewShotConfig, pool: int = 1
) -> SegmenterNet:
    """A segmenter on a copy of ``encoder``: head drawn from ``config.seed``, the encoder's
    cluster head copied; ``pool``: :func:`network_pool`."""
    if config.head == "auto":
        raise ValueError('head "auto" is resolved to one of PROBE_HEADS before a segmenter is made')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        segmenter = SegmenterNet(
            copy.deepcopy(encoder.network),
            num_classes,
            encoder.config.num_clusters,
            head=config.head,
            multiscale=config.multiscale,
            pool=pool,
        )
    segmenter.cluster_head = copy.deepcopy(encoder.cluster_head)
    return segmenter


class _Reporter:
    """Progress reports with an ETA from the mean step time."""

    def __init__(self, total: int, phase: str, callback: ProgressCallback | None) -> None:
        self.total, self.phase, self.callback = total, phase, callback
        self.began = time.monotonic()

    def __call__(self, step: int, loss: float) -> None:
        if self.callback is None:
            return
        eta = (time.monotonic() - self.began) / step * (self.total - step)
        self.callback(Progress(step, self.total, loss, eta, self.phase))


@torch.no_grad()
def _head_features(
    segmenter: SegmenterNet, images: np.ndarray, device: torch.device
) -> torch.Tensor:
    """``S×C_head×H×W`` head features of padded slices, computed slice by slice."""
    segmenter.eval()
    return torch.cat(
        [segmenter.head_features(torch.from_numpy(s[None, None]).to(device)) for s in images]
    )


def _pointwise(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a head of 1×1 convs and activations to ``C×N`` pixel columns: ``L×N`` logits.

    Columns, not rows: with few classes, softmax and cross-entropy over a short, strided class
    axis of an ``N×L`` matrix cost more than the head itself (measured: a probe step over 16,384
    pixels and 2 classes took 8.4 ms with rows, 3.7 ms with columns).
    """
    if isinstance(head, nn.Sequential):
        for layer in head:
            x = _pointwise(layer, x)
        return x
    if isinstance(head, nn.Conv2d):
        if head.kernel_size != (1, 1):
            raise ValueError(f"the linear probe needs a pixel-wise head, found {head}")
        weight = head.weight[:, :, 0, 0]
        return weight @ x if head.bias is None else torch.addmm(head.bias[:, None], weight, x)
    return head(x)


def _select_head_on_slices(
    encoder: Encoder, data: _TrainingSlices, num_classes: int, config: FewShotConfig
) -> HeadChoice:
    """:func:`select_probe_head` on training slices, running the encoder on them."""
    probe = _new_segmenter(encoder, num_classes, config.model_copy(update={"head": "linear"}))
    device = torch.device(config.device)
    probe.to(device)
    features = _head_features(probe, data.images, device)
    labels = torch.from_numpy(data.labels).long().to(device)
    annotated = labels != IGNORE_INDEX
    held = torch.from_numpy(_held_tiles(data.labels, config, 0)).to(device)[annotated]
    pixels = features.permute(0, 2, 3, 1)[annotated]
    return _select_head(encoder, pixels, labels[annotated], held, num_classes, config)


def _fit_linear(
    segmenter: SegmenterNet,
    data: _TrainingSlices,
    config: FewShotConfig,
    device: torch.device,
    progress: ProgressCallback | None,
) -> None:
    """Train the head on features of the annotated pixels (the encoder stays frozen)."""
    features = _head_features(segmenter, data.images, device)
    labels = torch.from_numpy(data.labels).long().to(device)
    annotated = labels != IGNORE_INDEX
    pixels = features.permute(0, 2, 3, 1)[annotated]  # N×C
    del features
    _train_head(segmenter.seg_head, pixels, labels[annotated], config, device, progress, "linear")


def _train_head(
    head: nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    config: FewShotConfig,
    device: torch.device,
    progress: ProgressCallback | None,
    phase: str,
) -> None:
    """Full-batch Adam on the head over ``N×C_head`` annotated pixel features and ``N`` targets.

    The head is pixel-wise (1×1 convs), so it runs as matrix products on the pixel rows: a step
    costs O(N·C_head·L). On the CPU these small products run on one thread: measured on the
    2-core machine, a step over 65,536 pixels took 21 ms on one thread and 140–430 ms on two
    (thread contention).
    """
    loss_fn = MaskedDiceCELoss()
    generator = torch.Generator().manual_seed(config.seed)
    head.train()
    optimiser = torch.optim.Adam(
        head.parameters(), lr=config.linear_lr, weight_decay=config.weight_decay
    )
    report = _Reporter(config.linear_steps, phase, progress)
    pick = _pixel_subset(targets.shape[0], config.linear_max_pixels, generator).to(device)
    x, y = pixels[pick].T.contiguous().to(device), targets[pick].to(device)
    mean, scale = _channel_statistics(x)
    x = (x - mean[:, None]) / scale[:, None]
    with torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        for step in range(config.linear_steps):
            logits = _pointwise(head, x)  # L×N, as a 1×L×N×1 map for the loss
            loss = loss_fn(logits[None, :, :, None], y[None, :, None])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            report(step + 1, float(loss.item()))
    _fold_standardisation(_first_conv(head), mean, scale)
    head.eval()


def _channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean ``μ`` and scale ``s`` (the standard deviation; 1 where it is below 1e-6)
    of ``C×N`` pixel columns.

    The probe trains on ``(x − μ)/s``: decoder maps are far from zero-mean (a pretrained or random
    U-Net's last ReLU block is ≥ 0), so with raw maps an MLP head's hidden units start with most
    pixels on one side of their ReLU, and with few steps the result depends on the draw of the
    initial weights (measured on the 4-channel toy encoder of the service tests, 3 encoders × 3
    head seeds, 5 steps: MLP Dice 0.16 ± 0.13 raw, 0.31 ± 0.12 standardised; 8 % of hidden
    units dead at initialisation raw, none standardised).
    """
    mean = x.mean(dim=1)
    std = x.std(dim=1) if x.shape[1] > 1 else torch.zeros_like(mean)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _first_conv(head: nn.Module) -> nn.Conv2d:
    """The 1×1 convolution a pixel-wise head applies first."""
    first = head[0] if isinstance(head, nn.Sequential) else head
    if not isinstance(first, nn.Conv2d):
        raise ValueError(f"the probe head must start with a 1×1 convolution, found {first}")
    return first


@torch.no_grad()
def _fold_standardisation(conv: nn.Conv2d, mean: torch.Tensor, scale: torch.Tensor) -> None:
    """Fold the input standardisation into ``conv``: ``W′ = W/s`` (per input channel),
    ``b′ = b − W′μ``, so that ``W′x + b′ = W(x − μ)/s + b`` and the exported head reads the raw
    maps, as the ONNX graph and :func:`segassist.models.features.apply_head` give them."""
    conv.weight.div_(scale[None, :, None, None])
    shift = conv.weight[:, :, 0, 0] @ mean
    if conv.bias is None:
        raise ValueError("the probe head's first convolution needs a bias to fold the shift")
    conv.bias.sub_(shift)


def fit_probe(
    encoder: Encoder,
    features: list[FeatureMaps],
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig | None = None,
    progress: ProgressCallback | None = None,
) -> SegmenterNet:
    """Fit the probe head (``config.head``; ``"auto"``: the one :func:`select_probe_head` picks)
    on cached decoder maps; the encoder never runs.

    The interactive path of the assist workflow: the same result as
    ``fit_segmenter(..., method="linear")`` on the same slices, but reading the annotated
    slices' head features from :class:`segassist.models.features.FeatureMaps` instead of running the
    encoder on them.

    Args:
        encoder: the encoder the maps were computed with (copied into the segmenter).
        features: one cached entry per labelled volume, all along the same axis.
        labels: ``X×Y×Z`` label volumes (``0…L−1``, 255 unannotated), same order.
        num_classes: L, background included.
        config: settings (``head``, ``multiscale``, ``linear_*``, ``seed``, ``device``).
        progress: called after every step with phase ``"fit"``.

    Raises:
        ValueError: mismatched shapes, label values ≥ ``num_classes``, or nothing annotated.
    """
    config = config or FewShotConfig()
    if config.head == "auto":
        choice = select_probe_head(encoder, features, labels, num_classes, config)
        config = config.model_copy(update={"head": choice.head})
    segmenter = _new_segmenter(encoder, num_classes, config)
    segmenter.requires_grad_(False)
    segmenter.seg_head.requires_grad_(True)
    segmenter.eval()
    pixels, classes, _ = _cached_pixels(segmenter, features, labels, num_classes, None)
    logger.info("probe (%s head) on %d annotated pixels", config.head, len(classes))
    device = torch.device(config.device)
    segmenter.to(device)
    _train_head(segmenter.seg_head, pixels, classes, config, device, progress, "fit")
    segmenter.requires_grad_(True)
    return segmenter.cpu().eval()


def _cached_pixels(
    segmenter: SegmenterNet,
    features: list[FeatureMaps],
    labels: list[np.ndarray],
    num_classes: int,
    holdout: FewShotConfig | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head features ``N×C_head`` and classes ``N`` of the annotated pixels, read from the cache,
    and ``N`` booleans: held out for validation (tiles of ``holdout``'s fraction and side, drawn
    per slice with its seed; all False without ``holdout``)."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature entries but {len(labels)} label volumes")
    rows: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    held: list[np.ndarray] = []
    for i, (entry, label) in enumerate(zip(features, labels, strict=True)):
        sparse = SparseLabels(np.asarray(label))
        try:
            sparse.check(num_classes)
        except ValueError as err:
            raise ValueError(f"label volume {i}: {err}") from err
        slices = np.moveaxis(sparse.labels.astype(np.uint8), entry.axis, 0)
        if slices.shape != (entry.num_slices, *entry.size):
            raise ValueError(
                f"label volume {i} has shape {label.shape}; its features are of "
                f"{entry.num_slices} slices of {entry.size} along axis {entry.axis}"
            )
        for s in annotated_slices(sparse.labels, entry.axis):
            target = torch.from_numpy(slices[s].astype(np.int64))
            mask = target != IGNORE_INDEX
            with torch.no_grad():
                x = head_input(segmenter, entry, [s])[0]  # C_head×H×W
            rows.append(x.permute(1, 2, 0)[mask])
            targets.append(target[mask])
            held.append(_held_tiles(slices[s][None], holdout, len(held))[0][mask.numpy()])
    if not rows:
        raise ValueError(f"no slice is annotated: every label voxel is {IGNORE_INDEX}")
    return torch.cat(rows), torch.cat(targets), torch.from_numpy(np.concatenate(held))


def _held_tiles(labels: np.ndarray, holdout: FewShotConfig | None, offset: int) -> np.ndarray:
    """``S×H×W`` booleans: the held-out tiles of :func:`_split_holdout` (seed + ``offset``).

    The tile side is ``holdout_tile`` but at most a quarter of the shorter slice side, so that a
    small slice still has tiles on both sides of the split.
    """
    if holdout is None:
        return np.zeros(labels.shape, dtype=bool)
    tile = min(holdout.holdout_tile, max(1, min(labels.shape[-2:]) // 4))
    _, held = _split_holdout(labels, holdout.holdout_fraction, tile, holdout.seed + offset)
    return np.zeros(labels.shape, dtype=bool) if held is None else held != IGNORE_INDEX


@dataclass(frozen=True)
class HeadChoice:
    """The probe head that validated best, and every candidate's validation Dice.

    Attributes:
        head: ``"linear"`` or ``"mlp"``.
        validation: candidate → mean Dice over classes on the held-out annotated pixels (None
            when nothing could be held out; the cheaper head, linear, then wins).
    """

    head: ProbeHead
    validation: dict[str, float | None]


def select_probe_head(
    encoder: Encoder,
    features: list[FeatureMaps],
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig | None = None,
) -> HeadChoice:
    """Pick the probe head for ``config.head="auto"`` on the annotator's slices only.

    Each candidate of :data:`PROBE_HEADS` is fitted (``config.linear_*``) on the annotated pixels
    outside held-out tiles (``config.holdout_fraction`` of the ``holdout_tile``-sided tiles of
    every annotated slice, as the fine-tune's early stopping holds out) and scored by the mean
    Dice over classes on the held-out pixels; the best wins, ties going to the cheaper (earlier)
    candidate. Costs one probe fit per candidate on top of the final fit.

    Tiles rather than leave-one-slice-out: with k = 1 there is no other slice, and k folds per
    candidate would cost k fits each in the interactive loop.
    """
    config = config or FewShotConfig()
    probe = _new_segmenter(encoder, num_classes, config.model_copy(update={"head": "linear"}))
    probe.requires_grad_(False).eval()
    pixels, classes, held = _cached_pixels(probe, features, labels, num_classes, config)
    return _select_head(encoder, pixels, classes, held, num_classes, config)


def _select_head(
    encoder: Encoder,
    pixels: torch.Tensor,
    classes: torch.Tensor,
    held: torch.Tensor,
    num_classes: int,
    config: FewShotConfig,
) -> HeadChoice:
    if not held.any() or held.all():
        logger.info("auto head: nothing to hold out, linear")
        return HeadChoice("linear", dict.fromkeys(PROBE_HEADS))
    device = torch.device(config.device)
    scores: dict[str, float] = {}
    for head in PROBE_HEADS:
        candidate = _new_segmenter(encoder, num_classes, config.model_copy(update={"head": head}))
        candidate.seg_head.to(device)
        _train_head(candidate.seg_head, pixels[~held], classes[~held], config, device, None, "fit")
        with torch.no_grad():
            logits = _pointwise(candidate.seg_head, pixels[held].T.contiguous().to(device))
        scores[head] = _mean_dice(logits.argmax(dim=0).cpu(), classes[held], num_classes)
    best = max(PROBE_HEADS, key=lambda h: scores[h])
    logger.info("auto head: %s (held-out Dice %s)", best, scores)
    return HeadChoice(best, {h: round(v, 4) for h, v in scores.items()})


def _mean_dice(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the classes present in ``truth`` or ``predicted`` (``N`` class ids each,
    ``N`` ≥ 1)."""
    values = []
    for c in range(num_classes):
        p, t = predicted == c, truth == c
        total = int(p.sum() + t.sum())
        if total:
            values.append(2 * float((p & t).sum()) / total)
    return float(np.mean(values))


def _pixel_subset(n: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of at most ``limit`` of ``n`` annotated pixels, drawn uniformly once.

    Drawing once (not per step) keeps a probe step a pair of small matrix products: re-drawing
    32k of 200k pixels every step cost more than the step itself. Uniform, so the class
    frequencies the probe sees are the annotation's.
    """
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit]


def _fit_finetune(
    segmenter: SegmenterNet,
    data: _TrainingSlices,
    config: FewShotConfig,
    device: torch.device,
    method: Method,
    progress: ProgressCallback | None,
    split: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> SegmenterNet:
    """Fine-tune encoder and head (optionally with a Mean Teacher); returns the best model.

    ``split``: the ``(train, held-out)`` labels of :func:`_split_holdout` (the default) or given
    by the caller (:func:`segassist.models.method_selection.select_method` holds out the pixels
    its other candidates are scored on)."""
    train_labels, holdout = split or _split_holdout(
        data.labels, config.holdout_fraction, config.holdout_tile, config.seed
    )
    if holdout is None:
        logger.info("no held-out labelled pixels: training all %d steps", config.steps)
    teacher: SegmenterNet | None = None
    unlabelled = data.unlabelled
    if method == "mean_teacher":
        if len(unlabelled) == 0:
            logger.warning("no unannotated slices: Mean Teacher reduces to fine-tuning")
        teacher = copy.deepcopy(segmenter).requires_grad_(False)
    optimiser = torch.optim.Adam(
        [
            {"params": segmenter.encoder.parameters(), "lr": config.encoder_lr},
            {"params": segmenter.seg_head.parameters(), "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    h, w = data.images.shape[1:]
    augment = _augmenter(config, h, w) if config.augment else None
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = MaskedDiceCELoss()
    candidates = [segmenter] if teacher is None else [teacher, segmenter]
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    stale = 0
    report = _Reporter(config.steps, method, progress)
    rampup = max(1.0, config.consistency_rampup * config.steps)
    for step in range(config.steps):
        segmenter.train()
        idx = torch.randint(len(data.images), (config.batch_size,), generator=generator)
        x, y = _batch(data.images, train_labels, idx.tolist(), augment)
        logits, _ = segmenter(x.to(device))
        loss = loss_fn(logits, y.to(device))
        if teacher is not None and len(unlabelled) > 0:
            u_idx = torch.randint(
                len(unlabelled), (config.unlabelled_batch_size,), generator=generator
            )
            u = torch.from_numpy(unlabelled[u_idx.numpy()][:, None]).to(device)
            with torch.no_grad():
                target = teacher(_noise(u, generator))[0].softmax(dim=1)
            student = segmenter(_noise(u, generator))[0].softmax(dim=1)
            weight = config.consistency_weight * math.exp(-5 * (1 - min(step / rampup, 1.0)) ** 2)
            loss = loss + weight * F.mse_loss(student, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if teacher is not None:
            _ema_update(teacher, segmenter, min(1 - 1 / (step + 2), config.ema_decay))
        report(step + 1, float(loss.item()))
        if holdout is not None and (
            (step + 1) % config.eval_every == 0 or step + 1 == config.steps
        ):
            values = [_holdout_loss(m, data.images, holdout, loss_fn, device) for m in candidates]
            value = min(values)
            if best is None or value < best[0]:
                state = candidates[values.index(value)].state_dict()
                best, stale = (value, copy.deepcopy(state)), 0
            else:
                stale += 1
                if stale >= config.patience:
                    logger.info(
                        "early stop at step %d (best held-out loss %.4f)", step + 1, best[0]
                    )
                    break
    if best is not None:
        candidates[0].load_state_dict(best[1])
    return candidates[0]


def _batch(
    images: np.ndarray,
    labels: np.ndarray,
    idx: list[int],
    augment: Callable[[dict[str, Any]], dict[str, Any]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B×1×H×W`` images and ``B×H×W`` labels, augmented slice by slice when asked.

    Labels are warped as ``label + 1`` with 0 for ignore, so pixels the affine brings in from
    outside the slice (zero padding) come out as ignore, never as background.
    """
    xs, ys = [], []
    for i in idx:
        image, label = images[i][None], labels[i][None]
        if augment is not None:
            code = np.where(label == IGNORE_INDEX, 0, label.astype(np.float32) + 1)
            out = augment({"image": image, "label": code.astype(np.float32)})
            image = np.asarray(out["image"], dtype=np.float32)
            warped = np.rint(np.asarray(out["label"])).astype(np.int64)
            label = np.where(warped == 0, IGNORE_INDEX, warped - 1)
        xs.append(torch.as_tensor(image, dtype=torch.float32))
        ys.append(torch.as_tensor(label[0], dtype=torch.long))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def _ema_update(teacher: SegmenterNet, student: SegmenterNet, decay: float) -> None:
    """``θ_teacher ← decay·θ_teacher + (1 − decay)·θ_student``.

    The caller warms the decay up as ``min(1 − 1/(t + 1), ema_decay)`` (t = updates so far, as in
    Tarvainen & Valpola's code): with a fixed 0.99 the teacher of a short few-shot run stays
    close to its random head and the consistency term pulls the student back to it.
    """
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)


@torch.no_grad()
def _holdout_loss(
    model: SegmenterNet,
    images: np.ndarray,
    holdout: np.ndarray,
    loss_fn: MaskedDiceCELoss,
    device: torch.device,
) -> float:
    model.eval()
    logits = torch.cat([model(torch.from_numpy(s[None, None]).to(device))[0] for s in images])
    return float(loss_fn(logits, torch.from_numpy(holdout).long().to(device)).item())
