"""The assist workflow, run as one job: ensure an encoder → fit → predict → store.

Every client (CLI, Python client, the MONAI Label routes, the browser page) starts this job
through ``POST /datasets/{id}/assist``; the API has already checked the request and resolved the
images, the label versions and the slice axis into the job's params (``segassist.server.assist``), so a
retry works on exactly what the user submitted. Phases, as the job's progress reports them:

1. ``encoder``: the ``encoder_id`` given, else the dataset's newest encoder, else the newest of the
   modality (of ``objective`` when one was asked for), else a short pretraining right here
   (``assist_pretrain_steps``) whose checkpoint seeds a longer one queued in the background
   (``background_pretrain_steps``); when that lands, the dataset's latest assist is refitted on it.
2. ``features`` (probe methods, and ``auto`` on a pretrained encoder): the decoder maps of every
   image involved, computed once per (encoder, image) into
   :class:`segassist.models.features.FeatureCache`.
3. ``fit``: the probe head on the cached maps of the annotated slices (seconds), or for
   ``finetune``/``mean_teacher`` the whole network (a training run with progress), or for
   ``auto`` the candidates ``config.auto_budget_seconds`` allows, the best on held-out labelled
   pixels kept (:func:`segassist.models.method_selection.select_method`).
4. ``export``: the segmenter to ONNX (registered, reusable for new images by ``predict`` jobs).
5. ``predict``: the head over the cached maps of every target image (probe), or ONNX Runtime
   (fine-tuned encoders); an image with its own sparse labels is predicted (probe methods) by
   propagating its labelled slices through the cached decoder maps
   (:mod:`segassist.models.propagation`; larger images than ``config.propagation_max_voxels``
   on a coarser in-plane grid: :func:`propagation_settings`; 0 turns it off);
   an image with its own sparse labels has its probabilities fused with
   the interpolation of its labelled slices before the argmax (:mod:`segassist.models.slice_prior`;
   off with ``config.slice_prior = false``), its labelled voxels returned as drawn, and the
   predicted objects its labelled voxels do not reach removed per class
   (:mod:`segassist.models.seeded_components`; off with ``config.seeded_components = false``);
   outputs written atomically under ``predictions/<model>/<image>/``.

Result: ``segmenter_id``, ``encoder_id``, ``axis``, ``method`` (the request's, or for a probe the
fitted head as the registry names it: ``probe-linear``, ``probe-mlp``; for ``auto`` the winner:
those, ``finetune`` or ``scratch``), ``validation`` (head ``"auto"``: each candidate head's Dice
on held-out tiles of the labelled slices, :func:`segassist.models.fewshot.select_probe_head`;
method ``"auto"``: candidate → ``{"dice", "seconds", "held_out"}`` or ``{"skipped": reason}``),
``predictions`` (image id → output URLs), ``next_slice`` (image id → the unannotated slice whose prediction is least certain: the
hint of where to label next), ``uncertainty`` (image id → mean normalised entropy of its
prediction, 0 = certain, 1 = uniform), ``slice_prior`` (image id → ``{"applied": false}`` or
``{"applied": true}`` with the fusion ``scale``, its ``source``, the leave-one-out ``scores``
and the number of ``held_out`` neighbour slices), ``components`` (image id → ``{"applied":
false}`` or the removed objects per class, the voxels removed and the classes kept as several
objects), ``propagation`` (image id → ``{"applied": false}`` or its ``seconds``), ``timings`` (seconds per phase), ``background_job_id`` when a longer
pretraining was queued, ``refine_job_id`` when a background refinement was
(:mod:`segassist.worker.refine`: a propagated image with 3 or more labelled slices, probe methods,
``config.refine``; on a queue of its own, so it runs beside a background pretraining, whose
refit then queues its own refinement).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from sqlalchemy import select

from segassist.models.chain_cache import chains_of
from segassist.models.export import export_feature_extractor
from segassist.models.features import (
    FeatureCache,
    FeatureMaps,
    FeatureRunner,
    apply_head,
    onnx_runner,
    torch_runner,
)
from segassist.models.fewshot import (
    FewShotConfig,
    Method,
    fit_probe,
    fit_segmenter,
    select_probe_head,
)
from segassist.models.held_out_slice import MIN_LABELLED_SLICES
from segassist.models.method_selection import MethodChoice, select_method
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import CHECKPOINT_NAME, Encoder, PretrainConfig
from segassist.models.pretrain import pretrain as run_pretraining
from segassist.models.progress import Progress
from segassist.models.propagation import PropagationConfig, map_features, propagate
from segassist.models.refinement import geometric_mean
from segassist.models.runtime._atomic import link_atomic
from segassist.models.runtime.configs import DEFAULT_HEAD, IGNORE_INDEX
from segassist.models.runtime.nifti import read_nifti
from segassist.models.runtime.predictor import (
    OnnxPredictor,
    Prediction,
    normalised_entropy,
    softmax,
)
from segassist.models.runtime.preprocess import Normalisation, default_normalisation, normalise
from segassist.models.seeded_components import ComponentFilter, keep_seeded_components
from segassist.models.slice_prior import DEFAULT_SCALE, ScaleChoice, fuse_with_prior
from segassist.models.volumes import class_argmax
from segassist.server.db import (
    Dataset,
    Image,
    Job,
    JobKind,
    JobStatus,
    Label,
    ModelKind,
    ModelRecord,
)
from segassist.server.db.cancel import cancel_jobs
from segassist.server.predictions import predict_to_folder, prediction_urls, write_prediction
from segassist.server.queue import enqueue_job
from segassist.worker import pipelines
from segassist.worker.jobs import JobContext

__all__ = [
    "PER_IMAGE_KEYS",
    "assist",
    "features",
    "propagation_settings",
    "refit_after_pretraining",
]

logger = logging.getLogger(__name__)

PER_IMAGE_KEYS = (
    "predictions",
    "next_slice",
    "uncertainty",
    "slice_prior",
    "components",
    "propagation",
)
"""The result's entries keyed by image id (module docstring)."""

_ENCODER_NAMESPACE = uuid.UUID("2b0d8c4e-7f5a-4e1b-9c3d-8a6e1f4b7d20")
_ENCODER_METHODS = ("finetune", "mean_teacher")
_SHORT_PRETRAIN = {"batch_size": 4}
"""Overrides of the short inline pretraining (and its background continuation, which resumes
its checkpoint and so must match): 4-slice batches halve a step's cost (~2 s on 2 cores)."""


class _Phases:
    """Wall time per phase, for the job's result (what the annotator waited for)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, ctx: JobContext, name: str) -> Iterator[None]:
        ctx.progress(Progress(0, 1, 0.0, 0.0, name))
        began = time.monotonic()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - began, 3)


def assist(ctx: JobContext) -> dict[str, Any]:
    """Run the assist workflow (module docstring); returns the job's result."""
    params = ctx.params
    dataset = pipelines._dataset(ctx)
    method = str(params.get("method", "linear"))
    axis = int(params["axis"])
    pairs = pipelines._labelled_images(ctx, params.get("label_ids"))
    targets = pipelines._images(ctx, params.get("image_ids"))
    class_names = pipelines._class_names(dataset)
    if "refit_of" not in params:  # a refit answers no new labels (worker.refine)
        _cancel_refinements(ctx)
    phase = _Phases()
    result: dict[str, Any] = {"axis": axis, "method": method}

    with phase(ctx, "encoder"):
        encoder_id, encoder, background = _ensure_encoder(ctx, dataset, axis, pairs, targets)
    result |= {"encoder_id": encoder_id, "background_job_id": background}
    # objective "none": the random initialisation the fine-tune starts from
    base = encoder or pipelines._encoder(ctx, dataset, None, {"axis": axis})

    config = FewShotConfig.from_dict(
        {
            **(params.get("config") or {}),
            "axis": axis,
            "head": params.get("head", DEFAULT_HEAD),
            "device": pipelines._torch_device(ctx),
        }
    )
    labels = [pipelines._read_label(label, image) for image, label in pairs]
    model_id = pipelines._model_id(ctx)
    probe = method not in _ENCODER_METHODS
    cached: dict[str, FeatureMaps] = {}
    if method == "auto":
        if encoder is not None and encoder_id is not None:
            with phase(ctx, "features"):
                labelled = [i for i, _ in pairs]
                cached = _cache_features(ctx, encoder_id, encoder, labelled, targets, axis)
        with phase(ctx, "fit"):
            auto, losses = _fit_auto(
                ctx, encoder, base, cached, pairs, labels, len(class_names), config
            )
        segmenter, probe = auto.segmenter, auto.method.startswith("probe-")
        result |= {"method": auto.method, "validation": auto.validation}
        if probe:
            config = config.model_copy(update={"head": auto.method.removeprefix("probe-")})
        if auto.method == "scratch":  # the winner owes nothing to the encoder
            encoder_id, encoder = None, None
    elif probe:
        if encoder is None or encoder_id is None:
            raise ValueError("a probe head needs an encoder (objective 'none' fits only finetune)")
        with phase(ctx, "features"):
            cached = _cache_features(ctx, encoder_id, encoder, [i for i, _ in pairs], targets, axis)
        with phase(ctx, "fit"):
            maps = [cached[image.id] for image, _ in pairs]
            if config.head == "auto":
                choice = select_probe_head(encoder, maps, labels, len(class_names), config)
                config = config.model_copy(update={"head": choice.head})
                result["validation"] = choice.validation
            result["method"] = f"probe-{config.head}"
            losses = pipelines._LossTracker(ctx)
            segmenter = fit_probe(encoder, maps, labels, len(class_names), config, losses)
    else:
        with phase(ctx, "fit"):
            segmenter, losses = _fit_network(
                ctx, base, encoder is None, pairs, labels, len(class_names), method, config
            )
    normalisation = base.normalisation
    with phase(ctx, "export"):
        with ctx.sessions() as session:
            published = session.get(ModelRecord, model_id) is not None  # an earlier attempt's
        if not published:
            pipelines.publish_segmenter(
                ctx,
                dataset,
                model_id,
                segmenter,
                class_names=class_names,
                axis=axis,
                normalisation=normalisation,
                encoder_id=encoder_id,
                objective=None if encoder is None else encoder.objective,
                method=result["method"],
                config=config,
                pairs=pairs,
                fit_loss=losses.last,
            )
    annotated = {image.id: set(label.annotated_slices.get(str(axis), [])) for image, label in pairs}
    own_labels = (
        {image.id: label for (image, _), label in zip(pairs, labels, strict=True)}
        if config.slice_prior or config.seeded_components or config.propagation_max_voxels
        else {}
    )
    with phase(ctx, "predict"):
        predictor = (
            None
            if probe
            else OnnxPredictor.from_folder(
                ctx.storage.model_dir(model_id), device=ctx.settings.device
            )
        )
        outputs = _predict_targets(
            ctx,
            model_id,
            targets,
            _Predictors(segmenter, predictor, cached, normalisation),
            own_labels,
            annotated,
            config,
        )
    result |= {
        "segmenter_id": model_id,
        **outputs,
        "fit_loss": losses.last,
        "timings": phase.seconds,
    }
    # (the refinement's candidates are full-size volumes: refine_max_voxels)
    if probe and method != "auto" and config.refine and encoder_id is not None:
        validated = [
            image.id
            for image, label in pairs
            if outputs["propagation"].get(image.id, {}).get("applied")
            and math.prod(image.shape) <= config.refine_max_voxels
            and len(label.annotated_slices.get(str(axis), [])) >= MIN_LABELLED_SLICES
        ]
        if validated:
            result["refine_job_id"] = _queue_refinement(ctx, pairs, targets, encoder_id, validated)
    return result


def features(ctx: JobContext) -> dict[str, Any]:
    """Cache the decoder maps of ``image_ids`` under the encoder the assist would reuse (a
    prefetch after upload; ``encoder_id`` in the params overrides)."""
    dataset = pipelines._dataset(ctx)
    encoder_id = ctx.params.get("encoder_id") or _reusable_encoder(ctx, dataset, None)
    if encoder_id is None:
        return {"encoder_id": None, "image_ids": []}
    encoder = pipelines._encoder(ctx, dataset, encoder_id, {})
    axis = int(ctx.params.get("axis", encoder.config.axis))
    images = pipelines._images(ctx, ctx.params.get("image_ids"))
    _cache_features(ctx, encoder_id, encoder, [], images, axis)
    return {"encoder_id": encoder_id, "image_ids": [image.id for image in images]}


def refit_after_pretraining(ctx: JobContext, encoder_id: str) -> str | None:
    """Queue a refit of the dataset's latest assist on the encoder that job ``ctx`` just made.

    Only when that assist ran on the short encoder this pretraining continues (its result names
    this job as ``background_job_id``): the annotator then gets the better segmentation without
    asking. Returns the new job's id.
    """
    from segassist.worker.app import get_app

    with ctx.owned_session() as session:
        latest = session.scalar(
            select(Job)
            .where(Job.dataset_id == ctx.dataset_id, Job.kind == JobKind.assist)
            .order_by(Job.created_at.desc())
            .limit(1)
        )
        if (
            latest is None
            or latest.status != JobStatus.succeeded
            or (latest.result or {}).get("background_job_id") != ctx.job_id
        ):
            return None
        job = Job(
            kind=JobKind.assist,
            dataset_id=ctx.dataset_id,
            params={**latest.params, "encoder_id": encoder_id, "refit_of": latest.id},
        )
        session.add(job)
    enqueue_job(get_app(), job)
    logger.info("queued assist job %s: refit of %s on encoder %s", job.id, latest.id, encoder_id)
    return job.id


# -- phases ----------------------------------------------------------------------------------------
def _ensure_encoder(
    ctx: JobContext,
    dataset: Dataset,
    axis: int,
    pairs: list[tuple[Image, Label]],
    targets: list[Image],
) -> tuple[str | None, Encoder | None, str | None]:
    """(encoder id, encoder, background pretraining job id) per the module docstring."""
    params = ctx.params
    objective = params.get("objective")
    if objective == "none":
        return None, None, None
    encoder_id = params.get("encoder_id") or _reusable_encoder(ctx, dataset, objective)
    if encoder_id is not None:
        return encoder_id, pipelines._encoder(ctx, dataset, encoder_id, {}), None
    return _quick_pretraining(ctx, dataset, axis, objective or "pix2rep", pairs, targets)


def _reusable_encoder(ctx: JobContext, dataset: Dataset, objective: str | None) -> str | None:
    """The dataset's newest encoder, else the newest of its modality (of ``objective`` if set)."""
    query = select(ModelRecord).where(
        ModelRecord.kind == ModelKind.encoder, ModelRecord.modality == dataset.modality
    )
    if objective is not None:
        query = query.where(ModelRecord.objective == objective)
    with ctx.sessions() as session:
        encoders = list(session.scalars(query.order_by(ModelRecord.created_at.desc())))
    own = [e for e in encoders if e.dataset_id == dataset.id]
    chosen = own or encoders
    return chosen[0].id if chosen else None


def _quick_pretraining(
    ctx: JobContext,
    dataset: Dataset,
    axis: int,
    objective: str,
    pairs: list[tuple[Image, Label]],
    targets: list[Image],
) -> tuple[str, Encoder, str | None]:
    """Pretrain briefly on the images involved, register the encoder, queue the continuation."""
    encoder_id = uuid.uuid5(_ENCODER_NAMESPACE, ctx.job_id).hex
    images = list({image.id: image for image in [*(i for i, _ in pairs), *targets]}.values())
    with ctx.sessions() as session:
        known = session.get(ModelRecord, encoder_id)
    if known is None:
        config = PretrainConfig.from_dict(
            {
                **_SHORT_PRETRAIN,
                "checkpoint_every": 10,  # the user waits: a killed worker loses little
                "objective": objective,
                "modality": dataset.modality,
                "axis": axis,
                "steps": ctx.settings.assist_pretrain_steps,
                "device": pipelines._torch_device(ctx),
            }
        )
        norm = default_normalisation(dataset.modality)
        volumes = [normalise(pipelines._read_image(image), norm) for image in images]
        logger.info(
            "no encoder for %s yet: pretraining %d steps first", dataset.modality, config.steps
        )
        encoder = run_pretraining(volumes, config, ctx.workdir, ctx.progress, norm)
        pipelines.publish_encoder(
            ctx,
            dataset,
            encoder_id,
            encoder,
            [i.id for i in images],
            {"steps": config.steps},
            owned_by_job=False,
        )
    encoder = pipelines._encoder(ctx, dataset, encoder_id, {})
    return encoder_id, encoder, _continue_in_background(ctx, dataset, encoder, images)


def _continue_in_background(
    ctx: JobContext, dataset: Dataset, encoder: Encoder, images: list[Image]
) -> str | None:
    """Queue a pretraining that resumes from this job's checkpoint up to the background budget."""
    steps = ctx.settings.background_pretrain_steps
    checkpoint = ctx.workdir / CHECKPOINT_NAME
    if steps <= encoder.config.steps or not checkpoint.exists():
        return None

    def seed_checkpoint(job: Job) -> None:
        workdir = ctx.storage.job_workdir(job.id)
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkpoint, workdir / CHECKPOINT_NAME)

    params = {
        "objective": encoder.config.objective,
        "image_ids": [image.id for image in images],
        "steps": steps,
        "config": {**_SHORT_PRETRAIN, "axis": encoder.config.axis},
    }
    job_id, new = _follow_up(ctx, JobKind.pretrain, "continues", params, seed_checkpoint)
    if new:
        logger.info("pretraining continues in the background: job %s (%d steps)", job_id, steps)
    return job_id


def _follow_up(
    ctx: JobContext,
    kind: JobKind,
    link: str,
    params: dict[str, Any],
    on_create: Callable[[Job], None] | None = None,
) -> tuple[str, bool]:
    """The job of ``kind`` this job queued (``params[link]`` = this job's id), else a new one
    with ``params`` plus that link, enqueued once its row is committed (``on_create`` runs in
    the same transaction first). Once per job: a retried attempt finds the first one's.
    Returns ``(job id, whether it is new)``."""
    from segassist.worker.app import get_app

    with ctx.owned_session() as session:
        job = session.scalar(
            select(Job).where(
                Job.kind == kind,
                Job.dataset_id == ctx.dataset_id,
                Job.params[link].as_string() == ctx.job_id,
            )
        )
        new = job is None
        if job is None:
            job = Job(kind=kind, dataset_id=ctx.dataset_id, params={**params, link: ctx.job_id})
            session.add(job)
            session.flush()
            if on_create is not None:
                on_create(job)
        job_id = job.id
    if new:
        enqueue_job(get_app(), job)
    return job_id, new


def _cancel_refinements(ctx: JobContext) -> None:
    """Cancel the dataset's unfinished refinements: this assist answers newer labels, and a
    refinement's training would take the cores from it. A refit does not call this: the
    refinement of the assist it refits scores the answer the refit must beat."""
    with ctx.owned_session() as session:
        cancel_jobs(session, Job.kind == JobKind.refine, Job.dataset_id == ctx.dataset_id)


def _queue_refinement(
    ctx: JobContext,
    pairs: list[tuple[Image, Label]],
    targets: list[Image],
    encoder_id: str,
    validated: list[str],
) -> str:
    """Queue the background refinement of this assist (:mod:`segassist.worker.refine`) on the
    refinement queue, once per assist job."""
    params = {
        "axis": ctx.params["axis"],
        "label_ids": [label.id for _, label in pairs],
        "image_ids": [image.id for image in targets],
        "encoder_id": encoder_id,
        "validated": validated,
        "config": ctx.params.get("config") or {},
        "probabilities": bool(ctx.params.get("probabilities")),
    }
    job_id, new = _follow_up(ctx, JobKind.refine, "refine_of", params)
    if new:
        logger.info("queued refine job %s of assist %s (images %s)", job_id, ctx.job_id, validated)
    return job_id


def _cache_features(
    ctx: JobContext,
    encoder_id: str,
    encoder: Encoder,
    labelled: list[Image],
    targets: list[Image],
    axis: int,
) -> dict[str, FeatureMaps]:
    """The cached maps of every image (computing the missing ones; progress over slices)."""
    cache = FeatureCache(ctx.settings.feature_dir, ctx.settings.feature_cache_bytes)
    images = list({image.id: image for image in [*labelled, *targets]}.values())
    runner: FeatureRunner | None = None
    total = sum(int(image.shape[axis]) for image in images)
    done = 0
    began = time.monotonic()
    out: dict[str, FeatureMaps] = {}
    for image in images:

        def report(step: int, _count: int, offset: int = done) -> None:
            elapsed = time.monotonic() - began
            eta = elapsed / max(offset + step, 1) * (total - offset - step)
            ctx.progress(Progress(offset + step, total, 0.0, eta, "features"))

        def volume(image: Image = image) -> np.ndarray:
            return normalise(pipelines._read_image(image), encoder.normalisation)

        cached = cache.get(encoder_id, image.id)
        if cached is None or cached.axis != axis:
            runner = runner or _feature_runner(ctx, cache, encoder_id, encoder)
        with torch.random.fork_rng(devices=[]):
            out[image.id] = cache.get_or_compute(
                encoder_id, image.id, encoder, volume, axis, report, runner
            )
        done += int(image.shape[axis])
    return out


def _feature_runner(
    ctx: JobContext, cache: FeatureCache, encoder_id: str, encoder: Encoder
) -> FeatureRunner:
    """ONNX Runtime on the encoder's exported feature extractor (exported once, kept beside its
    cache entries), about twice as fast as PyTorch eager on the CPU; PyTorch if export fails."""
    path = cache.root / encoder_id / "extractor.onnx"
    if not path.is_file():
        try:
            export_feature_extractor(
                encoder.network, encoder.cluster_head, path, size_divisor=encoder.size_divisor
            )
        except (RuntimeError, ValueError) as exc:
            logger.warning(
                "feature extractor of %s not exported (%s): PyTorch runs it", encoder_id, exc
            )
            return torch_runner(encoder)
    return onnx_runner(path, ctx.settings.device)


def _fit_network(
    ctx: JobContext,
    base: Encoder,
    scratch: bool,
    pairs: list[tuple[Image, Label]],
    labels: list[np.ndarray],
    num_classes: int,
    method: str,
    config: FewShotConfig,
) -> tuple[SegmenterNet, pipelines._LossTracker]:
    """Fine-tune (or Mean Teacher) the whole network from ``base``: a run with progress."""
    if scratch:  # scratch settings, with only what the request set on top
        given = {**(ctx.params.get("config") or {}), "axis": config.axis, "head": config.head}
        config = FewShotConfig.for_scratch(**given, device=config.device)
    images = [normalise(pipelines._read_image(image), base.normalisation) for image, _ in pairs]
    losses = pipelines._LossTracker(ctx)
    segmenter = fit_segmenter(
        base, images, labels, num_classes, cast(Method, method), config, losses
    )
    return segmenter, losses


def _fit_auto(
    ctx: JobContext,
    encoder: Encoder | None,
    base: Encoder,
    cached: dict[str, FeatureMaps],
    pairs: list[tuple[Image, Label]],
    labels: list[np.ndarray],
    num_classes: int,
    config: FewShotConfig,
) -> tuple[MethodChoice, pipelines._LossTracker]:
    """``method="auto"``: :func:`segassist.models.method_selection.select_method` within
    ``config.auto_budget_seconds``, the probes reading the cached maps; scratch starts from a
    random encoder of the pretrained one's architecture (``base`` itself without one)."""
    scratch = base if encoder is None else Encoder.random(encoder.config, encoder.normalisation)
    images = [normalise(pipelines._read_image(image), base.normalisation) for image, _ in pairs]
    maps = [cached[image.id] for image, _ in pairs] if cached else None
    losses = pipelines._LossTracker(ctx)
    choice = select_method(encoder, scratch, images, labels, num_classes, config, maps, losses)
    return choice, losses


@dataclass(frozen=True)
class _Predictors:
    """What segments the targets: ``predictor`` (the exported network; None for a probe, whose
    ``segmenter`` head reads the ``cached`` maps of each image, ``normalisation`` being the
    encoder's). ``blend``: a labelled image with ``cached`` maps gets the normalised geometric
    mean of the network's probabilities and those propagated from its labelled slices (the
    refinement's ``"blend"``, :mod:`segassist.models.refinement`)."""

    segmenter: SegmenterNet
    predictor: OnnxPredictor | None
    cached: dict[str, FeatureMaps]
    normalisation: Normalisation
    blend: bool = False


def _predict_targets(
    ctx: JobContext,
    model_id: str,
    targets: list[Image],
    using: _Predictors,
    own_labels: dict[str, np.ndarray],
    annotated: dict[str, set[int]],
    config: FewShotConfig,
) -> dict[str, Any]:
    """The predict phase: segment every target, corrected by its own labels when it has them,
    write the outputs under ``predictions/<model_id>/<image>/``; returns the result's
    ``predictions``, ``next_slice``, ``uncertainty``, ``slice_prior``, ``components`` and
    ``propagation`` entries (module doc)."""
    axis = int(ctx.params["axis"])
    with_probabilities = bool(ctx.params.get("probabilities"))
    outputs: dict[str, dict[str, Any]] = {key: {} for key in PER_IMAGE_KEYS}
    for done, image in enumerate(targets, start=1):
        ctx.check_cancelled()
        out_dir = ctx.storage.prediction_dir(model_id, image.id)
        sparse = own_labels.get(image.id)
        evidence = _OwnLabels()
        if using.predictor is not None and sparse is None:
            path = pipelines._existing_file(Path(image.path), f"image {image.id}")
            names = predict_to_folder(using.predictor, path, out_dir, with_probabilities, True)
            uncertainty, _, _ = read_nifti(out_dir / "uncertainty.nii.gz")
        elif using.predictor is not None and sparse is not None:
            names, uncertainty, evidence = _predict_network_with_own_labels(
                using.predictor,
                image,
                sparse,
                config,
                out_dir,
                with_probabilities,
                using.cached.get(image.id) if using.blend else None,
            )
        else:
            names, uncertainty, evidence = _predict_from_cache(
                using.segmenter,
                using.cached[image.id],
                image,
                out_dir,
                using.normalisation,
                with_probabilities,
                sparse,
                config,
            )
        for key, entry in evidence.to_dicts().items():
            outputs[key][image.id] = entry
        outputs["predictions"][image.id] = prediction_urls(model_id, image.id, names)
        outputs["next_slice"][image.id] = _least_certain_slice(
            np.asarray(uncertainty), axis, annotated.get(image.id, set())
        )
        outputs["uncertainty"][image.id] = round(float(np.mean(uncertainty)), 6)
        ctx.progress(Progress(done, len(targets), 0.0, 0.0, "predict"))
    return outputs


def _predict_from_cache(
    segmenter: SegmenterNet,
    cached: FeatureMaps,
    image: Image,
    out_dir: Path,
    normalisation: Normalisation,
    with_probabilities: bool,
    sparse: np.ndarray | None = None,
    config: FewShotConfig | None = None,
    batch_size: int = 16,
) -> tuple[list[str], np.ndarray, _OwnLabels]:
    """Apply the head to the cached maps of ``image`` and write its outputs; with the image's own
    ``sparse`` labels, corrected by them first (:func:`_with_own_labels`, as ``config`` says):
    the image is propagated from those labels instead (:func:`propagation_settings`; unless
    ``config.propagation_max_voxels`` is 0), and the head is not applied to it. Returns the
    names written, the ``X×Y×Z`` uncertainty (normalised entropy) and what the labels
    changed."""
    path = pipelines._existing_file(Path(image.path), f"image {image.id} ({image.name})")
    volume, affine, header = read_nifti(path)
    axis = cached.axis
    config = config or FewShotConfig()
    evidence = _OwnLabels()
    if sparse is None:
        labels, uncertainty, probabilities = _apply_head(
            segmenter, cached, volume.shape, with_probabilities, batch_size
        )
    else:
        propagated = None
        if config.propagation_max_voxels > 0:
            began = time.perf_counter()
            probabilities = propagate(
                map_features(cached),
                sparse,
                axis,
                segmenter.num_classes,
                propagation_settings(config),
                chains_of(cached),
            ).probabilities
            propagated = round(time.perf_counter() - began, 3)
        else:
            _, _, head = _apply_head(segmenter, cached, volume.shape, True, batch_size)
            probabilities = cast(np.ndarray, head)
        labels, probabilities, uncertainty, evidence = _with_own_labels(
            probabilities, sparse, axis, config, propagated
        )
    clusters = np.moveaxis(np.asarray(cached.clusters), 0, axis)
    prediction = Prediction(
        labels,
        clusters,
        probabilities if with_probabilities else None,
        uncertainty if with_probabilities else None,
    )
    names = write_prediction(
        prediction, volume, (affine, header), out_dir, axis, normalisation, cached.folder
    )
    for name in ("clusters.nii.gz", "clusters.png"):  # rendered once per (encoder, image)
        if not (cached.folder / name).exists():
            link_atomic(out_dir / name, cached.folder / name)
    return names, uncertainty, evidence


def propagation_settings(config: FewShotConfig) -> PropagationConfig:
    """The propagation of ``config``: the default affinity on a grid of at most
    ``config.propagation_max_voxels`` voxels (a large image's slices pooled in-plane,
    :func:`segassist.models.propagation.grid_factor`)."""
    return PropagationConfig(max_voxels=config.propagation_max_voxels)


def _apply_head(
    segmenter: SegmenterNet,
    cached: FeatureMaps,
    shape: tuple[int, ...],
    with_probabilities: bool,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(labels, uncertainty, probabilities or None)`` of the head over every cached slice, on
    the image's ``X×Y×Z`` grid (probabilities ``L×X×Y×Z``)."""
    axis = cached.axis
    labels = np.empty(shape, dtype=np.uint8)
    uncertainty = np.empty(shape, dtype=np.float32)
    probabilities = (
        np.empty((segmenter.num_classes, *shape), dtype=np.float32) if with_probabilities else None
    )
    labels_view = np.moveaxis(labels, axis, 0)
    uncertainty_view = np.moveaxis(uncertainty, axis, 0)
    probs_view = None if probabilities is None else np.moveaxis(probabilities, axis + 1, 0)
    for start in range(0, cached.num_slices, batch_size):
        stop = min(start + batch_size, cached.num_slices)
        logits = apply_head(segmenter, cached, start, stop)
        labels_view[start:stop] = logits.argmax(axis=1)
        probs = softmax(logits)
        uncertainty_view[start:stop] = normalised_entropy(probs)
        if probs_view is not None:
            probs_view[start:stop] = probs
    return labels, uncertainty, probabilities


def _predict_network_with_own_labels(
    predictor: OnnxPredictor,
    image: Image,
    sparse: np.ndarray,
    config: FewShotConfig,
    out_dir: Path,
    with_probabilities: bool,
    blend_with: FeatureMaps | None = None,
) -> tuple[list[str], np.ndarray, _OwnLabels]:
    """The fine-tuned network's prediction of ``image`` corrected by its own ``sparse`` labels
    (:func:`_with_own_labels`), written under ``out_dir``; as :func:`_predict_from_cache`
    returns. With ``blend_with`` (the image's cached maps), the network's probabilities are first
    pooled with those propagated from ``sparse`` through the maps (their normalised geometric
    mean, the refinement's ``"blend"``, :func:`segassist.models.refinement.geometric_mean`)."""
    path = pipelines._existing_file(Path(image.path), f"image {image.id}")
    volume, affine, header = read_nifti(path)
    raw = predictor.predict(
        np.asarray(volume, dtype=np.float32), with_probabilities=True, with_uncertainty=False
    )
    if raw.probabilities is None:
        raise ValueError("the network returned no probabilities")
    manifest = predictor.manifest
    probabilities, propagated, clusters, rendered = raw.probabilities, None, raw.clusters, None
    del raw  # its probabilities are this function's alone: freed as soon as they are blended
    if blend_with is not None:
        began = time.perf_counter()
        spread = propagate(
            map_features(blend_with),
            sparse,
            manifest.axis,
            manifest.num_classes,
            propagation_settings(config),
            chains_of(blend_with),
        ).probabilities
        propagated = round(time.perf_counter() - began, 3)
        # the blend over the propagation's (slice-major) array, which the prior then reuses
        probabilities = geometric_mean(spread, probabilities, out=spread)
        del spread
        # the encoder's cluster map, not the scratch network's
        clusters = np.moveaxis(np.asarray(blend_with.clusters), 0, manifest.axis)
        rendered = blend_with.folder
    labels, probabilities, uncertainty, evidence = _with_own_labels(
        probabilities, sparse, manifest.axis, config, propagated
    )
    prediction = Prediction(
        labels, clusters, probabilities if with_probabilities else None, uncertainty
    )
    names = write_prediction(
        prediction,
        volume,
        (affine, header),
        out_dir,
        manifest.axis,
        manifest.normalisation,
        rendered,
    )
    return names, uncertainty, evidence


@dataclass(frozen=True)
class _OwnLabels:
    """What an image's own labels changed in its prediction (``None``: that step did not run)."""

    prior: ScaleChoice | None = None
    components: ComponentFilter | None = None
    propagation_seconds: float | None = None

    def to_dicts(self) -> dict[str, dict[str, Any]]:
        """The job result's ``slice_prior``, ``components`` and ``propagation`` entries of the
        image."""
        off: dict[str, Any] = {"applied": False}
        return {
            "slice_prior": off if self.prior is None else {"applied": True, **self.prior.to_dict()},
            "components": (
                off if self.components is None else {"applied": True, **self.components.to_dict()}
            ),
            "propagation": (
                off
                if self.propagation_seconds is None
                else {"applied": True, "seconds": self.propagation_seconds}
            ),
        }


def _with_own_labels(
    probabilities: np.ndarray,
    sparse: np.ndarray,
    axis: int,
    config: FewShotConfig,
    propagated: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _OwnLabels]:
    """The model's ``L×X×Y×Z`` probabilities (consumed: overwritten where
    :func:`~segassist.models.slice_prior.fuse_with_prior` can reuse them, so a caller passes
    an array of its own) corrected by the image's own ``sparse`` labels:
    fused with their slice prior (``config.slice_prior``;
    :func:`segassist.models.slice_prior.fuse_with_prior`, scale by leave-one-labelled-slice-out;
    the default scale when the probabilities were propagated from those very slices, which
    leaving one out cannot judge; ``propagated`` = the seconds that took),
    labelled voxels as drawn, then unreached objects removed (``config.seeded_components``;
    :func:`segassist.models.seeded_components.keep_seeded_components`: a removed voxel's
    probability of its class moves to the background). Returns ``(labels, probabilities,
    uncertainty, what changed)``."""
    choice = None
    if config.slice_prior:
        scale = None if propagated is None else DEFAULT_SCALE
        fused = fuse_with_prior(probabilities, sparse, axis, scale, reuse=True)
        labels, probabilities, choice = fused.labels, fused.probabilities, fused.choice
    else:
        labels = class_argmax(probabilities)
        drawn = sparse != IGNORE_INDEX
        labels[drawn] = sparse[drawn]
    components = None
    if config.seeded_components:
        before = labels
        labels, removed, components = keep_seeded_components(labels, sparse)
        if components.removed_voxels:  # the arrays are this call's own: changed in place
            for c in components.removed:
                moved = removed & (before == c)
                probabilities[0][moved] += probabilities[c][moved]
                probabilities[c][moved] = 0.0
    uncertainty = normalised_entropy(probabilities[None])[0]
    return labels, probabilities, uncertainty, _OwnLabels(choice, components, propagated)


def _least_certain_slice(uncertainty: np.ndarray, axis: int, annotated: set[int]) -> int | None:
    """Index of the unannotated slice with the highest mean uncertainty, or ``None``."""
    per_slice = np.moveaxis(uncertainty, axis, 0).reshape(uncertainty.shape[axis], -1).mean(axis=1)
    candidates = [i for i in range(len(per_slice)) if i not in annotated]
    if not candidates:
        return None
    return int(max(candidates, key=lambda i: float(per_slice[i])))
