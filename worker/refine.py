"""The background refinement of an assist result: a network trained from scratch, blended with
the propagation, replaces the fast segmentation when it does better on a labelled slice held
out.

The assist job answers in seconds from the encoder's cached maps (propagation of the labelled
slices, :mod:`segassist.worker.assist`). Where the structure is defined by its position and shape
more than by its look (vertebrae, cortex), a segmentation network trained from a random
initialisation on the labelled slices does better once three or more are labelled
(``bench/results/fewshot.md``), and much worse on organs that look like their neighbours
(abdominal CT). Which one an annotator's structure is, only their own slices can say. So after
an assist whose labelled images were propagated, the assist job queues this job on the
refinement queue (:data:`~segassist.server.queue.REFINEMENT_QUEUE`, so it never waits behind a
background pretraining; ``FewShotConfig.refine``; images of at most
``FewShotConfig.refine_max_voxels``, with at least
:data:`~segassist.models.held_out_slice.MIN_LABELLED_SLICES` labelled slices); it runs:

1. ``features``: the cached maps of the validated images (normally a cache hit).
2. ``validate``: the middle labelled slice of each validated image hidden
   (:func:`~segassist.models.held_out_slice.hold_out_middle_slice`); a scratch network trained
   on the other slices (:data:`~segassist.models.runtime.configs.REFINE_SCRATCH`, one thread;
   on slices averaged in-plane when over ``FewShotConfig.scratch_max_side`` pixels a side);
   the candidates of :mod:`segassist.models.refinement` (propagation, its blend with the
   network) made from those slices, each corrected as the assist corrects (slice prior, seeded
   components) and scored by the mean Dice on the hidden slices, averaged over the images.
3. When the blend scores higher (a tie goes to propagation): ``fit`` (the network again, on
   every labelled slice), ``export`` (ONNX, registered: the network alone), ``predict`` (the
   validated images: the network pooled with their propagation (normalised geometric mean),
   corrected by their own
   labels, with the encoder's cluster map). Other target images keep the assist's prediction
   (nothing validated the network on them): its files are linked under the new segmenter, so
   whoever serves "the dataset's newest segmenter" (MONAI Label, DICOMweb) finds, for every
   image of the assist, the segmentation the page shows. The segmenter's lineage names the
   assist's (``refines``): an image it has no prediction of gets that one from MONAI Label's
   ``infer`` (:func:`~segassist.server.monailabel.apps.serving_segmenter`), not the network
   alone. Otherwise the job ends there and the assist's segmentation stands.

The refinement of a *refit* (the assist redone on the longer background pretraining's encoder,
:func:`~segassist.worker.assist.refit_after_pretraining`) must also beat the answer the refit
replaced, which its own refinement scored on the same hidden slices: that score joins the
validation as ``"previous"`` (ties go to it), and when it wins that answer is made the newest
again (outcome ``restored``: its segmenter registered anew,
:func:`~segassist.worker.pipelines.republish_segmenter`, its predictions linked under it). The
refit's own propagation is on screen meanwhile. A refit neither cancels nor supersedes the
refinement of the assist it refits, so that score exists unless the refinement failed.

A job is skipped as ``superseded`` when a newer assist of the dataset exists: the annotator has
moved on (a new assist also cancels unfinished refinements). Result: ``refine_of``, ``outcome``
(``refined``, ``kept``, ``restored`` or ``superseded``), ``validation`` (candidate → Dice on the
hidden slices, and ``held_out_slices``: image → index), ``timings``; when refined, also the
assist result's keys (``segmenter_id``, ``predictions``, ``next_slice``, ``uncertainty``,
``slice_prior``, ``components``, ``propagation``: the assist's entries, the propagation it
blended) with ``method: "blend"`` and ``encoder_id: null``; when restored, those of the earlier
answer (its ``method`` and ``encoder_id``; ``restores``: the segmenter copied).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from segassist.models.chain_cache import chains_of
from segassist.models.fewshot import FewShotConfig, fit_segmenter
from segassist.models.held_out_slice import HeldOutSlice, hold_out_middle_slice
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder
from segassist.models.progress import Progress
from segassist.models.propagation import map_features, propagate
from segassist.models.refinement import (
    CANDIDATES,
    PREFERENCE,
    PREVIOUS,
    choose,
    geometric_mean,
    network_probabilities,
)
from segassist.models.runtime._atomic import link_atomic
from segassist.models.runtime.configs import REFINE_SCRATCH
from segassist.models.runtime.predictor import OnnxPredictor
from segassist.models.runtime.preprocess import normalise
from segassist.models.threads import torch_threads
from segassist.server.db import Job, JobKind, JobStatus
from segassist.server.predictions import PREDICTION_FILES, prediction_urls
from segassist.worker import pipelines
from segassist.worker.assist import (
    PER_IMAGE_KEYS,
    _cache_features,
    _Phases,
    _predict_targets,
    _Predictors,
    _with_own_labels,
    propagation_settings,
)
from segassist.worker.jobs import JobContext

__all__ = ["CANCEL_POLL_SECONDS", "refine"]

logger = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.2
"""Least time between two reads of the job's cancellation while the network trains. A newer
assist cancels the refinement; until the refinement notices, it holds a core that the assist's
own fit needs (progress writes alone read it once a second). The first step reads it too, and so
does each step of the start-up (features, image): an annotator's quick correction arrives while
the refinement is still starting. Measured through the service bench's loop (a corrected label
resubmitted at once, 5 runs before and after, 2 with it off): the correction's answer took
5.16–6.05 s (median 5.62) before, 4.62–5.49 s (median 5.34) after, 4.70–4.79 s with the
refinement off: a gain within the spread. In one of those runs the refinement still ran 0.6 s
after the correction's assist started: a start-up step under way is not interrupted."""


def refine(ctx: JobContext) -> dict[str, Any]:
    """Run the refinement (module docstring); returns the job's result."""
    params = ctx.params
    axis = int(params["axis"])
    result: dict[str, Any] = {"refine_of": params["refine_of"], "axis": axis}
    newer = _newer_assist(ctx, str(params["refine_of"]))
    if newer is not None:
        logger.info("refinement of %s skipped: assist %s is newer", params["refine_of"], newer)
        return result | {"outcome": "superseded", "superseded_by": newer}
    dataset = pipelines._dataset(ctx)
    pairs = pipelines._labelled_images(ctx, params["label_ids"])
    targets = pipelines._images(ctx, params["image_ids"])
    num_classes = len(pipelines._class_names(dataset))
    encoder_id = str(params["encoder_id"])
    encoder = pipelines._encoder(ctx, dataset, encoder_id, {})
    config = FewShotConfig.from_dict(
        {**(params.get("config") or {}), "axis": axis, "device": pipelines._torch_device(ctx)}
    )
    labels = [pipelines._read_label(label, image) for image, label in pairs]
    held: dict[str, HeldOutSlice] = {}
    for (image, _), label in zip(pairs, labels, strict=True):
        hidden = hold_out_middle_slice(label, axis) if image.id in params["validated"] else None
        if hidden is not None:
            held[image.id] = hidden
    if not held:
        raise ValueError(f"no image of {params['validated']} has 3 labelled slices to hold out")
    phase = _Phases()
    ctx.check_cancelled()  # between the start-up's steps: CANCEL_POLL_SECONDS
    with phase(ctx, "features"):
        images = [image for image, _ in pairs if image.id in held]
        cached = _cache_features(ctx, encoder_id, encoder, images, [], axis)
    ctx.check_cancelled()
    scratch = Encoder.random(encoder.config, encoder.normalisation)
    volumes = [normalise(pipelines._read_image(image), scratch.normalisation) for image, _ in pairs]
    ctx.check_cancelled()
    with phase(ctx, "validate"):
        reduced = [
            held[image.id].labels if image.id in held else label
            for (image, _), label in zip(pairs, labels, strict=True)
        ]
        network, _ = _fit_scratch(ctx, scratch, volumes, reduced, num_classes, config)
        scores: dict[str, list[float]] = {name: [] for name in CANDIDATES}
        for (image, _), volume in zip(pairs, volumes, strict=True):
            if image.id not in held:
                continue
            ctx.check_cancelled()
            hidden = held[image.id]
            began = time.perf_counter()
            spread = propagate(
                map_features(cached[image.id]),
                hidden.labels,
                axis,
                num_classes,
                propagation_settings(config),
                chains_of(cached[image.id]),
            ).probabilities
            spread_seconds = round(time.perf_counter() - began, 3)
            network_says = network_probabilities(
                network, volume, axis, before_batch=ctx.check_cancelled
            )
            # one candidate at a time, each over an array it consumes (three whole volumes of
            # class probabilities at once limited the size of image refined): the blend over
            # the network's, then the propagation itself
            blend = geometric_mean(spread, network_says, out=network_says)
            del network_says
            scores["blend"].append(_hidden_dice(blend, hidden, axis, config, spread_seconds))
            del blend
            scores["propagation"].append(_hidden_dice(spread, hidden, axis, config, spread_seconds))
            del spread
    validation = {name: round(float(np.mean(values)), 4) for name, values in scores.items()}
    earlier = _earlier_answer(ctx, str(params["refine_of"]), held)
    if earlier is not None:
        validation = {PREVIOUS: earlier.score} | validation
    winner = choose(validation)
    result["validation"] = validation | {
        "held_out_slices": {image_id: hidden.index for image_id, hidden in held.items()}
    }
    if winner == PREVIOUS and earlier is not None:
        restored = _restore(ctx, phase, earlier, [image.id for image in targets])
        return result | {"outcome": "restored", **restored, "timings": phase.seconds}
    if winner == "propagation":
        return result | {"outcome": "kept", "timings": phase.seconds}
    with phase(ctx, "fit"):
        segmenter, losses = _fit_scratch(ctx, scratch, volumes, labels, num_classes, config)
    model_id = pipelines._model_id(ctx)
    assist = _assist_result(ctx, str(params["refine_of"]))
    with phase(ctx, "export"):
        if pipelines._registered(ctx) is None:
            pipelines.publish_segmenter(
                ctx,
                dataset,
                model_id,
                segmenter,
                class_names=pipelines._class_names(dataset),
                axis=axis,
                normalisation=scratch.normalisation,
                encoder_id=None,
                objective=None,
                method="scratch",
                config=config,
                pairs=pairs,
                fit_loss=losses.last,
                refines=assist.get("segmenter_id"),
            )
    with phase(ctx, "predict"):
        predictor = OnnxPredictor.from_folder(
            ctx.storage.model_dir(model_id), device=ctx.settings.device
        )
        outputs = _predict_targets(
            ctx,
            model_id,
            [image for image in targets if image.id in held],
            _Predictors(segmenter, predictor, cached, scratch.normalisation, blend=True),
            {image.id: label for (image, _), label in zip(pairs, labels, strict=True)},
            {image.id: set(label.annotated_slices.get(str(axis), [])) for image, label in pairs},
            config,
        )
        _carry_over(
            ctx,
            assist,
            model_id,
            [image.id for image in targets if image.id not in held],
            outputs,
        )
    for image_id in held:  # the propagation blended is the assist's (read back, not redone)
        if image_id in (assist.get("propagation") or {}):
            outputs["propagation"][image_id] = assist["propagation"][image_id]
    return result | {
        "outcome": "refined",
        "method": winner,
        "segmenter_id": model_id,
        "encoder_id": None,
        **outputs,
        "fit_loss": losses.last,
        "timings": phase.seconds,
    }


def _hidden_dice(
    probabilities: np.ndarray,
    hidden: HeldOutSlice,
    axis: int,
    config: FewShotConfig,
    propagated: float,
) -> float:
    """Dice on the hidden slice of a candidate's ``L×X×Y×Z`` probabilities (consumed),
    corrected as the assist corrects; both candidates hold the propagation (``propagated``:
    its seconds), so the prior is fused at the assist's strength."""
    labels, *_ = _with_own_labels(probabilities, hidden.labels, axis, config, propagated)
    return hidden.dice(labels)


def _assist_result(ctx: JobContext, assist_id: str) -> dict[str, Any]:
    """The result of the refined assist job (empty if the job is gone)."""
    with ctx.sessions() as session:
        assist = session.get(Job, assist_id)
        return dict(assist.result or {}) if assist is not None else {}


def _carry_over(
    ctx: JobContext,
    done: dict[str, Any],
    model_id: str,
    image_ids: list[str],
    outputs: dict[str, dict[str, Any]],
) -> None:
    """Link the prediction files of ``image_ids`` that the refined assist (its result ``done``)
    made into ``predictions/<model_id>/`` (:func:`~segassist.models.runtime._atomic.link_atomic`:
    no bytes copied) and add the assist result's entries of those images to ``outputs`` (the API
    paths rewritten to ``model_id``)."""
    source = done.get("segmenter_id")
    for image_id in image_ids:
        names = list((done.get("predictions") or {}).get(image_id) or {})
        if source is None or not names:
            continue
        out_dir = ctx.storage.prediction_dir(model_id, image_id)
        for name in names:
            link_atomic(
                ctx.storage.prediction_dir(str(source), image_id) / PREDICTION_FILES[name],
                out_dir / PREDICTION_FILES[name],
            )
        outputs["predictions"][image_id] = prediction_urls(model_id, image_id, names)
        for key in PER_IMAGE_KEYS[1:]:
            if image_id in (done.get(key) or {}):
                outputs[key][image_id] = done[key][image_id]


def _newer_assist(ctx: JobContext, assist_id: str) -> str | None:
    """The id of the dataset's newest assist job newer than ``assist_id``, refits of
    ``assist_id`` aside (a refit does not answer new labels: it waits for this refinement's
    score, :func:`_earlier_answer`)."""
    with ctx.sessions() as session:
        refined = session.get(Job, assist_id)
        if refined is None:
            return None
        newer = session.scalars(
            select(Job)
            .where(
                Job.dataset_id == ctx.dataset_id,
                Job.kind == JobKind.assist,
                Job.created_at > refined.created_at,
            )
            .order_by(Job.created_at.desc())
        )
        return next(
            (job.id for job in newer if (job.params or {}).get("refit_of") != assist_id), None
        )


@dataclass(frozen=True)
class _Earlier:
    """The answer a refit replaced: its score on the hidden slices (the refinement that made it
    the annotator's, its winner's) and the job result holding its segmentation."""

    score: float
    result: dict[str, Any]


def _earlier_answer(
    ctx: JobContext, assist_id: str, held: dict[str, HeldOutSlice]
) -> _Earlier | None:
    """What the annotator had before the refit ``assist_id``, or None: ``assist_id`` is no
    refit, or the refinement of the assist it refits did not succeed on the same hidden slices
    (it was cancelled, superseded, failed, or its labels differ).

    That answer is the refinement's own segmentation when it ``refined`` or ``restored``, else
    (``kept``) the refitted assist's; its score is the best of the refinement's validation,
    which is its winner's by :func:`~segassist.models.refinement.choose`."""
    hidden = {image_id: slice_.index for image_id, slice_ in held.items()}
    with ctx.sessions() as session:
        refit = session.get(Job, assist_id)
        replaced_id = (refit.params or {}).get("refit_of") if refit is not None else None
        replaced = session.get(Job, replaced_id) if replaced_id else None
        if replaced is None or replaced.status != JobStatus.succeeded:
            return None
        refinement_id = (replaced.result or {}).get("refine_job_id")
        refinement = session.get(Job, refinement_id) if refinement_id else None
        if refinement is None or refinement.status != JobStatus.succeeded:
            return None
        answer, assisted = dict(refinement.result or {}), dict(replaced.result or {})
    validation = answer.get("validation") or {}
    outcome = answer.get("outcome")
    if (
        outcome not in ("refined", "kept", "restored")
        or validation.get("held_out_slices") != hidden
    ):
        return None
    score = max(float(value) for name, value in validation.items() if name in PREFERENCE)
    return _Earlier(score, assisted if outcome == "kept" else answer)


def _restore(
    ctx: JobContext, phase: _Phases, earlier: _Earlier, image_ids: list[str]
) -> dict[str, Any]:
    """Make ``earlier``'s segmentation the newest again: its segmenter registered anew
    (:func:`~segassist.worker.pipelines.republish_segmenter`) with its prediction files of
    ``image_ids`` linked under it; returns the result's keys (``restores`` names the copied
    segmenter)."""
    model_id = pipelines._model_id(ctx)
    source = str(earlier.result["segmenter_id"])
    with phase(ctx, "export"):
        if pipelines._registered(ctx) is None:
            pipelines.republish_segmenter(ctx, source, model_id)
    outputs: dict[str, dict[str, Any]] = {key: {} for key in PER_IMAGE_KEYS}
    with phase(ctx, "predict"):
        _carry_over(ctx, earlier.result, model_id, image_ids, outputs)
    return {
        "method": earlier.result.get("method"),
        "segmenter_id": model_id,
        "encoder_id": earlier.result.get("encoder_id"),
        "restores": source,
        **outputs,
    }


def _fit_scratch(
    ctx: JobContext,
    scratch: Encoder,
    volumes: list[np.ndarray],
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig,
) -> tuple[SegmenterNet, pipelines._LossTracker]:
    """A network trained from ``scratch`` on the normalised ``volumes`` and their sparse
    ``labels``: :meth:`FewShotConfig.for_scratch` with :data:`REFINE_SCRATCH` (the settings the
    benchmark measured), the request's own few-shot settings on top; torch on one thread on the
    CPU (:mod:`segassist.models.threads`: two spin-wait whenever the other core is busy)."""
    settings = FewShotConfig.for_scratch(
        **(
            REFINE_SCRATCH
            | (ctx.params.get("config") or {})
            | {"axis": config.axis, "device": config.device}
        )
    )
    losses = _CancellableLosses(ctx)
    with torch_threads(1 if config.device == "cpu" else torch.get_num_threads()):
        network = fit_segmenter(scratch, volumes, labels, num_classes, "finetune", settings, losses)
    return network, losses


class _CancellableLosses(pipelines._LossTracker):
    """The loss tracker, also reading the job's cancellation every
    :data:`CANCEL_POLL_SECONDS` (one row read; raises
    :class:`~segassist.worker.jobs.JobCancelled`)."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self._checked = -math.inf  # the first step reads it: the fit's setup may take a while

    def __call__(self, progress: Progress) -> None:
        super().__call__(progress)
        now = time.monotonic()
        if now - self._checked >= CANCEL_POLL_SECONDS:
            self._checked = now
            self.ctx.check_cancelled()
