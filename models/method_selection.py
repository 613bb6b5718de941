"""``method="auto"``: fit the candidates the time budget allows, keep the one that validates best
on the annotator's own slices.

Candidates, cheapest first (:data:`CANDIDATES`, named as the model registry names methods):

- ``"probe-linear"``, ``"probe-mlp"``: a probe head on the pretrained encoder's decoder maps
  (cached maps when given, else the encoder run on the annotated slices);
- ``"finetune"``: the pretrained encoder and a head trained together (:class:`FewShotConfig`);
- ``"scratch"``: the same from a random initialisation (:meth:`FewShotConfig.for_scratch`).

Validation: one set of held-out pixels for every candidate (:func:`held_out_pixels`): with two
or more labelled slices, the whole middle one; with one, ``holdout_fraction`` of its
``holdout_tile``-sided tiles. Each candidate trains on the other annotated pixels and is scored
by the mean Dice over the classes present on the held-out pixels (``2|P∩T| / (|P| + |T|)`` per
class, averaged). A network candidate early-stops on tiles of its own training pixels
(:func:`segassist.models.fewshot.fit_segmenter`'s split of them), never on the scored ones.
Whole slices rather than tiles when there are two: tiles of the labelled slices score how well
a candidate fills in a slice it has mostly seen, not the slices nobody labelled. Measured
(``bench/results/method_selection.md``, one seed, short network fits): on TotalSegmentator MR at
k = 3, tile validation ranked the fine-tune first (0.91 vs the MLP probe's 0.88 on the tiles)
but on the unlabelled slices it scored 0.47 and the MLP probe 0.86; with the middle slice held
out, auto picks the MLP probe. On the spine CT at k = 3 the slice held out did worse than
tiles: scratch was best (0.75) and auto picked the linear probe (0.59). Either validation
picked the best candidate in 2 of the 4 cells measured.

The best Dice wins, ties going to the cheaper candidate. A probe winner is refitted on every
annotated pixel (one more head fit, outside the budget); a network winner is returned as
fitted, without the held-out pixels (a refit would double its cost).

Budget: probes always run (they are the floor; ``probe-mlp`` is skipped when ``probe-linear``'s
time exceeds what is left). A network candidate is skipped without training when none of the
budget is left, or when a lower bound of its cost exceeds what is: ``steps · 3·B·t_f`` (a step
is a forward and a backward pass over ``B`` slices, ≈ 3 forwards; ``t_f`` = one forward of one
slice without gradient, timed once for both networks). The bound is loose: on the spine CT
(k = 1, a loaded 2-core machine) the fine-tune took 33 s where it said 5.3 s (augmentation
and held-out evaluations are not in it). So a candidate that passes it trains, and stops
(recorded as skipped) when, after its first :data:`TIMED_STEPS` steps, elapsed + ETA (mean
step time × steps left, augmentation included) exceeds the seconds left, or at any later step
once they are spent. Early stopping may end a fit sooner than its ``steps``; the estimate is
for all of them.

No validation: when nothing can be held out (k = 1 with a small labelled area: every tile of the
annotation lands on one side), the cheapest candidate available is fitted on every pixel,
whatever the budget, and the record says why. Without a pretrained encoder, ``"scratch"`` is
the only candidate and is fitted whatever the budget.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segassist.models.features import FeatureMaps
from segassist.models.fewshot import (
    FewShotConfig,
    _cached_pixels,
    _collect,
    _fit_finetune,
    _head_features,
    _held_tiles,
    _in_plane_shape,
    _mean_dice,
    _new_segmenter,
    _pad_to,
    _pointwise,
    _split_holdout,
    _train_head,
    _TrainingSlices,
    network_pool,
)
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder
from segassist.models.progress import Progress, ProgressCallback
from segassist.models.runtime.configs import PROBE_HEADS, ProbeHead
from segassist.models.volumes import IGNORE_INDEX, annotated_slices

__all__ = ["CANDIDATES", "TIMED_STEPS", "MethodChoice", "held_out_pixels", "select_method"]

logger = logging.getLogger(__name__)

CANDIDATES = ("probe-linear", "probe-mlp", "finetune", "scratch")
"""Every candidate of ``method="auto"``, cheapest first (ties go to the earlier)."""

TIMED_STEPS = 3
"""Steps of a network candidate timed before its full cost is estimated from them."""


@dataclass(frozen=True)
class MethodChoice:
    """What :func:`select_method` picked.

    Attributes:
        method: the winner, one of :data:`CANDIDATES`.
        segmenter: its fitted segmenter (eval mode, CPU).
        validation: candidate → ``{"dice", "seconds", "held_out"}`` (``dice`` None when nothing
            was held out; ``held_out``: number of pixels scored) or ``{"skipped": reason}``.
    """

    method: str
    segmenter: SegmenterNet
    validation: dict[str, dict[str, Any]]


class _OverBudget(Exception):
    """A network candidate's fit would exceed (or has exceeded) the seconds left."""


def held_out_pixels(
    labels: list[np.ndarray], axis: int, config: FewShotConfig, size: tuple[int, int]
) -> np.ndarray:
    """``S×H×W`` booleans over the annotated slices (volume by volume, slice order, zero-padded to
    ``size``): the annotated pixels every candidate is scored on.

    Two or more annotated slices: every annotated pixel of the middle one (index S // 2; with
    one volume, the median labelled position), so the score measures what the annotator needs,
    the segmentation of slices nobody labelled. One slice: tiles of it, as
    :func:`segassist.models.fewshot.select_probe_head` holds them out (drawn with
    ``config.seed``).
    """
    slices = [
        np.moveaxis(np.asarray(label, dtype=np.uint8), axis, 0)[s]
        for label in labels
        for s in annotated_slices(np.asarray(label), axis)
    ]
    if len(slices) >= 2:
        masks = [np.zeros(s.shape, dtype=bool) for s in slices]
        masks[len(slices) // 2] = slices[len(slices) // 2] != IGNORE_INDEX
    else:
        masks = [_held_tiles(slices[0][None], config, 0)[0]]
    return np.stack([_pad_to(m, *size, False) for m in masks])


def select_method(
    encoder: Encoder | None,
    scratch: Encoder,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig | None = None,
    features: list[FeatureMaps] | None = None,
    progress: ProgressCallback | None = None,
) -> MethodChoice:
    """Fit the candidates within ``config.auto_budget_seconds`` and keep the best (module doc).

    Args:
        encoder: the pretrained encoder (probes and ``"finetune"``), or None (scratch only).
        scratch: the random initialisation ``"scratch"`` starts from (same architecture).
        images: ``X×Y×Z`` volumes normalised to [0, 1] for ``encoder`` (or ``scratch``).
        labels: ``X×Y×Z`` label volumes, ``0…num_classes−1`` or 255 (unannotated).
        num_classes: L, background included.
        config: few-shot settings; ``"scratch"`` uses :meth:`FewShotConfig.for_scratch` with the
            keys set here on top.
        features: the cached maps of the labelled volumes along the slice axis, same order: the
            probes read them instead of running the encoder (the assist workflow's cache).
        progress: forwarded every step of every fit.

    Raises:
        ValueError: as :func:`segassist.models.fewshot.fit_segmenter`.
    """
    config = config or FewShotConfig()
    began = time.monotonic()

    def left() -> float:
        return config.auto_budget_seconds - (time.monotonic() - began)

    base = encoder or scratch
    axis = base.config.axis if config.axis is None else config.axis
    pool = network_pool(scratch, "finetune", _in_plane_shape(images, axis), config)
    data = _collect(images, labels, num_classes, axis, base.size_divisor * pool)
    held = held_out_pixels(labels, axis, config, data.labels.shape[1:])
    annotated = data.labels != IGNORE_INDEX
    record: dict[str, dict[str, Any]] = {}
    if not held.any() or not (annotated & ~held).any():
        return _without_validation(
            encoder, scratch, data, labels, num_classes, config, features, progress, pool
        )
    device = torch.device(config.device)
    truth = torch.from_numpy(data.labels[held].astype(np.int64))
    probe_pixels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    if encoder is None:
        record |= {c: {"skipped": "no pretrained encoder"} for c in CANDIDATES[:2]}
    else:
        probe_pixels = _probe_pixels(encoder, data, held, labels, num_classes, config, features)
        pixels, classes, held_px = probe_pixels
        for head in PROBE_HEADS:
            spent = [r["seconds"] for r in record.values() if "seconds" in r]
            if spent and spent[-1] > left():
                record[f"probe-{head}"] = {
                    "skipped": f"a probe fit took {spent[-1]:.1f} s, {max(left(), 0):.1f} s left"
                }
                continue
            start = time.monotonic()
            probe = _new_segmenter(encoder, num_classes, config.model_copy(update={"head": head}))
            probe.seg_head.to(device)
            train = ~held_px
            _train_head(probe.seg_head, pixels[train], classes[train], config, device, None, "fit")
            with torch.no_grad():
                logits = _pointwise(probe.seg_head, pixels[held_px].T.contiguous().to(device))
            dice = _mean_dice(logits.argmax(dim=0).cpu(), classes[held_px], num_classes)
            record[f"probe-{head}"] = _score(dice, start, int(held_px.sum()))
    networks: dict[str, SegmenterNet] = {}
    forward: dict[tuple[int, ...], float] = {}
    for name, start_from, network_config, candidate_pool in (
        ("finetune", encoder, _network_config(config), 1),
        (
            "scratch",
            scratch,
            FewShotConfig.for_scratch(**_set_keys(_network_config(config))),
            pool,
        ),
    ):
        if start_from is None:
            record[name] = {"skipped": "no pretrained encoder"}
            continue
        # without an encoder, scratch is the only candidate: the budget cannot skip it
        seconds_left = left() if encoder is not None else math.inf
        try:
            start = time.monotonic()
            segmenter = _fit_network(
                start_from,
                candidate_pool,
                data,
                held,
                num_classes,
                network_config,
                seconds_left,
                progress,
                forward,
            )
        except _OverBudget as exc:
            record[name] = {"skipped": str(exc)}
            continue
        predicted = torch.from_numpy(_predict(segmenter, data, device)[held])
        record[name] = _score(_mean_dice(predicted, truth, num_classes), start, int(held.sum()))
        networks[name] = segmenter
    record = {c: record[c] for c in CANDIDATES}
    scored = [c for c in CANDIDATES if "dice" in record[c]]
    winner = max(scored, key=lambda c: record[c]["dice"])
    logger.info("auto method: %s (%s)", winner, record)
    if winner in networks:
        return MethodChoice(winner, networks[winner].cpu().eval(), record)
    if probe_pixels is None or encoder is None:
        raise RuntimeError(f"the winner {winner} was not fitted")  # unreachable: probes scored
    winning_head: ProbeHead = "mlp" if winner == "probe-mlp" else "linear"
    final = _refit_probe(encoder, probe_pixels[:2], num_classes, config, winning_head, progress)
    return MethodChoice(winner, final, record)


def _score(dice: float | None, start: float, held_out: int) -> dict[str, Any]:
    return {
        "dice": None if dice is None else round(dice, 4),
        "seconds": round(time.monotonic() - start, 3),
        "held_out": held_out,
    }


def _set_keys(config: FewShotConfig) -> dict[str, Any]:
    """The fields ``config`` was given explicitly (what ``for_scratch`` keeps on top)."""
    return config.model_dump(mode="json", include=config.model_fields_set)


def _network_config(config: FewShotConfig) -> FewShotConfig:
    """``config`` for a network candidate: head ``"auto"`` reads linear, as in ``fit_segmenter``."""
    return config.model_copy(update={"head": "linear"}) if config.head == "auto" else config


def _probe_pixels(
    encoder: Encoder,
    data: _TrainingSlices,
    held: np.ndarray,
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig,
    features: list[FeatureMaps] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head features ``N×C_head``, classes ``N`` and held-out flags ``N`` of the annotated pixels,
    from ``features`` (the cache) or the encoder run on the padded slices."""
    probe = _new_segmenter(encoder, num_classes, config.model_copy(update={"head": "linear"}))
    probe.requires_grad_(False).eval()
    annotated = torch.from_numpy(data.labels != IGNORE_INDEX)
    flags = torch.from_numpy(held)[annotated]  # both paths list pixels slice by slice, row-major
    if features is not None:
        pixels, classes, _ = _cached_pixels(probe, features, labels, num_classes, None)
        return pixels, classes, flags
    maps = _head_features(probe, data.images, torch.device("cpu"))
    classes = torch.from_numpy(data.labels.astype(np.int64))[annotated]
    return maps.permute(0, 2, 3, 1)[annotated], classes, flags


def _refit_probe(
    encoder: Encoder,
    pixels: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    config: FewShotConfig,
    head: ProbeHead,
    progress: ProgressCallback | None,
) -> SegmenterNet:
    """The winning probe head trained on every annotated pixel (what ``fit_probe`` fits)."""
    segmenter = _new_segmenter(encoder, num_classes, config.model_copy(update={"head": head}))
    device = torch.device(config.device)
    segmenter.to(device)
    _train_head(segmenter.seg_head, *pixels, config, device, progress, "fit")
    return segmenter.cpu().eval()


@torch.no_grad()
def _forward_seconds(segmenter: SegmenterNet, data: _TrainingSlices, device: torch.device) -> float:
    """Seconds of one forward pass of one slice, no gradient, after one untimed warm-up (timed
    cold on the spine CT's 80×80 slices it gave 0.84 s, warm 0.018 s, on the loaded machine)."""
    segmenter.eval()
    x = torch.from_numpy(data.images[:1, None]).to(device)
    segmenter(x)
    start = time.monotonic()
    segmenter(x)
    return time.monotonic() - start


def _fit_network(
    start_from: Encoder,
    pool: int,
    data: _TrainingSlices,
    held: np.ndarray,
    num_classes: int,
    config: FewShotConfig,
    seconds_left: float,
    progress: ProgressCallback | None,
    forward: dict[tuple[int, ...], float],
) -> SegmenterNet:
    """Fine-tune a segmenter on ``start_from`` (pooled ``pool``×, :func:`network_pool`) with
    ``held`` held out, within ``seconds_left``.

    ``forward``: one-slice forward seconds per architecture (U-Net channels and pooling), timed
    once and shared by the candidates (finetune and scratch have the same network).

    Raises:
        _OverBudget: no time is left, the lower bound or the estimate after
            :data:`TIMED_STEPS` steps exceeds ``seconds_left``, or the fit outlasts it.
    """
    if seconds_left <= 0:
        raise _OverBudget("no time left")
    device = torch.device(config.device)
    segmenter = _new_segmenter(start_from, num_classes, config, pool)
    segmenter.cluster_head.requires_grad_(False)
    segmenter.to(device)
    architecture = (*start_from.config.channels, pool)
    if architecture not in forward:
        forward[architecture] = _forward_seconds(segmenter, data, device)
    lower_bound = config.steps * 3 * config.batch_size * forward[architecture]
    if lower_bound > seconds_left:
        raise _OverBudget(
            f"{config.steps} steps would take at least {lower_bound:.1f} s, "
            f"{max(seconds_left, 0):.1f} s left"
        )
    began = time.monotonic()

    def guard(report: Progress) -> None:
        if progress is not None:
            progress(report)
        elapsed = time.monotonic() - began
        if report.step == TIMED_STEPS and elapsed + report.eta_seconds > seconds_left:
            raise _OverBudget(
                f"{report.total} steps would take about {elapsed + report.eta_seconds:.1f} s "
                f"(first {TIMED_STEPS} timed), {seconds_left:.1f} s left"
            )
        if elapsed > seconds_left:
            raise _OverBudget(f"budget spent at step {report.step} of {report.total}")

    train = np.where(held, IGNORE_INDEX, data.labels).astype(np.uint8)
    split = _split_holdout(train, config.holdout_fraction, config.holdout_tile, config.seed)
    return _fit_finetune(segmenter, data, config, device, "finetune", guard, split)


@torch.no_grad()
def _predict(segmenter: SegmenterNet, data: _TrainingSlices, device: torch.device) -> np.ndarray:
    """``S×H×W`` argmax classes of the padded training slices."""
    segmenter.eval()
    return np.concatenate(
        [
            segmenter(torch.from_numpy(s[None, None]).to(device))[0].argmax(dim=1).cpu().numpy()
            for s in data.images
        ]
    )


def _without_validation(
    encoder: Encoder | None,
    scratch: Encoder,
    data: _TrainingSlices,
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig,
    features: list[FeatureMaps] | None,
    progress: ProgressCallback | None,
    pool: int,
) -> MethodChoice:
    """Nothing to hold out: the cheapest candidate available, fitted on every annotated pixel
    (scratch pooled ``pool``×)."""
    reason = "nothing could be held out (too few labelled pixels): the cheapest candidate won"
    start = time.monotonic()
    if encoder is not None:
        winner = "probe-linear"
        nothing_held = np.zeros(data.labels.shape, dtype=bool)
        pixels = _probe_pixels(encoder, data, nothing_held, labels, num_classes, config, features)
        segmenter = _refit_probe(encoder, pixels[:2], num_classes, config, "linear", progress)
    else:
        winner = "scratch"
        scratch_config = FewShotConfig.for_scratch(**_set_keys(_network_config(config)))
        device = torch.device(scratch_config.device)
        network = _new_segmenter(scratch, num_classes, scratch_config, pool)
        network.cluster_head.requires_grad_(False)
        network.to(device)
        everything = (data.labels, None)
        network = _fit_finetune(
            network, data, scratch_config, device, "finetune", progress, everything
        )
        segmenter = network.cpu().eval()
    logger.info("auto method: %s (%s)", winner, reason)
    record = {c: {"skipped": reason} for c in CANDIDATES}
    record[winner] = _score(None, start, 0)
    return MethodChoice(winner, segmenter, record)
