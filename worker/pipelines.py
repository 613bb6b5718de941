"""What each job kind does with :mod:`models`: pretrain, finetune, predict.

Each pipeline takes a :class:`segassist.worker.jobs.JobContext` and returns the job's ``result``. Model
artifacts are built in a hidden temporary folder under ``data_dir/models`` and renamed into
``models/<model_id>/`` in one step, then registered; the model id is derived from the job id, so a
retried job replaces a half-published folder instead of leaving a second one, and a job whose
model is already registered (its worker died before recording success) returns that model.

Params (validated by the API, ``segassist.server.schemas``):

- ``pretrain``: ``objective``, ``image_ids`` (default: every image), ``steps``, ``config``
  (:class:`segassist.models.pretrain.PretrainConfig` fields).
- ``finetune``: ``encoder_id`` (``None``: random initialisation), ``method``, ``label_ids``
  (default: the ``final`` label of every labelled image), ``config``
  (:class:`segassist.models.fewshot.FewShotConfig` fields, plus ``"encoder"``: PretrainConfig fields of the
  random encoder when ``encoder_id`` is ``None``, e.g. its ``channels``).
- ``predict``: ``model_id``, ``image_ids`` (default: every image), ``probabilities``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from segassist.models.export import export_segmenter
from segassist.models.fewshot import METHODS, FewShotConfig, fit_segmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.pretrain import pretrain as run_pretraining
from segassist.models.progress import Progress
from segassist.models.runtime._atomic import atomic_dir
from segassist.models.runtime.manifest import Manifest
from segassist.models.runtime.nifti import read_nifti
from segassist.models.runtime.predictor import OnnxPredictor
from segassist.models.runtime.preprocess import Normalisation, default_normalisation, normalise
from segassist.server.db import Dataset, Image, Label, ModelKind, ModelRecord
from segassist.server.db.tables import FINAL_TAG
from segassist.server.predictions import predict_to_folder, prediction_urls
from segassist.worker.jobs import JobContext

__all__ = [
    "ENCODER_FILE",
    "finetune",
    "predict",
    "pretrain",
    "publish_encoder",
    "publish_segmenter",
    "republish_segmenter",
]

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"
_MODEL_NAMESPACE = uuid.UUID("6f1c3a2e-5d0b-4c8e-9a61-2b7f0e4d9c15")


def pretrain(ctx: JobContext) -> dict[str, Any]:
    """Pretrain an encoder on the dataset's images; result ``{"encoder_id"}``."""
    existing = _registered(ctx)
    if existing is not None:
        return {"encoder_id": existing}
    dataset = _dataset(ctx)
    images = _images(ctx, ctx.params.get("image_ids"))
    overrides = dict(ctx.params.get("config") or {})
    overrides.setdefault("device", _torch_device(ctx))
    overrides |= {"objective": ctx.params.get("objective", "pix2rep"), "modality": dataset.modality}
    if ctx.params.get("steps") is not None:
        overrides["steps"] = int(ctx.params["steps"])
    config = PretrainConfig.from_dict(overrides)
    norm = default_normalisation(dataset.modality)
    volumes = [normalise(_read_image(image), norm) for image in images]
    logger.info(
        "pretraining %s on %d volume(s) of dataset %s: %s",
        config.objective,
        len(volumes),
        dataset.id,
        config.to_dict(),
    )
    losses = _LossTracker(ctx)
    encoder = run_pretraining(volumes, config, ctx.workdir, losses, norm)
    model_id = _model_id(ctx)
    publish_encoder(
        ctx,
        dataset,
        model_id,
        encoder,
        [image.id for image in images],
        {"steps": config.steps, "final_loss": losses.last},
    )
    shutil.rmtree(ctx.storage.job_workdir(ctx.job_id), ignore_errors=True)
    result: dict[str, Any] = {"encoder_id": model_id}
    if ctx.params.get("continues"):
        from segassist.worker.assist import refit_after_pretraining

        refit = refit_after_pretraining(ctx, model_id)
        if refit is not None:
            result["refit_job_id"] = refit
    return result


def publish_encoder(
    ctx: JobContext,
    dataset: Dataset,
    model_id: str,
    encoder: Encoder,
    image_ids: list[str],
    metrics: dict[str, Any],
    owned_by_job: bool = True,
) -> None:
    """Write ``encoder`` to ``models/<model_id>/`` (atomically) and register it.

    ``owned_by_job``: the job's own model (found again by a retry through ``job_id``); an
    assist job's short pretraining is not (the segmenter is that job's model).
    """
    config = encoder.config
    lineage = {
        "dataset_id": dataset.id,
        "image_ids": image_ids,
        "objective": config.objective,
        "config": config.to_dict(),
        "job_id": ctx.job_id,
    }
    with _publishing(ctx, model_id) as folder:
        encoder.save(folder / ENCODER_FILE)
        Manifest(
            kind="encoder",
            labels={},
            num_classes=0,
            num_clusters=config.num_clusters,
            axis=config.axis,
            normalisation=encoder.normalisation,
            size_divisor=encoder.size_divisor,
            objective=config.objective,
            lineage=lineage,
            metrics=metrics,
        ).save(folder)
    _register(
        ctx,
        ModelRecord(
            id=model_id,
            kind=ModelKind.encoder,
            dataset_id=dataset.id,
            modality=dataset.modality,
            objective=config.objective,
            job_id=ctx.job_id if owned_by_job else None,
            lineage=lineage,
            metrics=metrics,
            folder=str(ctx.storage.model_dir(model_id)),
        ),
    )


def finetune(ctx: JobContext) -> dict[str, Any]:
    """Fit a few-shot segmenter and export it to ONNX; result ``{"segmenter_id"}``."""
    existing = _registered(ctx)
    if existing is not None:
        return {"segmenter_id": existing}
    dataset = _dataset(ctx)
    method = str(ctx.params.get("method", "linear"))
    if method not in METHODS:
        raise ValueError(f"unknown few-shot method {method!r}; expected one of {METHODS}")
    overrides = dict(ctx.params.get("config") or {})
    encoder_overrides = dict(overrides.pop("encoder", None) or {})
    encoder_id = ctx.params.get("encoder_id")
    encoder = _encoder(ctx, dataset, encoder_id, encoder_overrides)
    overrides.setdefault("device", _torch_device(ctx))
    if encoder_id is None and method != "linear":
        config = FewShotConfig.for_scratch(**overrides)
    else:
        config = FewShotConfig.from_dict(overrides)
    pairs = _labelled_images(ctx, ctx.params.get("label_ids"))
    class_names = _class_names(dataset)
    images = [normalise(_read_image(image), encoder.normalisation) for image, _ in pairs]
    labels = [_read_label(label, image) for image, label in pairs]
    logger.info(
        "few-shot %s on %d labelled volume(s), %d classes, encoder %s",
        method,
        len(pairs),
        len(class_names),
        encoder_id or "random",
    )
    losses = _LossTracker(ctx)
    segmenter = fit_segmenter(
        encoder,
        images,
        labels,
        len(class_names),
        method=method,  # narrowed to Method by the METHODS check above
        config=config,
        progress=losses,
    )
    ctx.progress(Progress(0, 1, losses.last or 0.0, 0.0, "export"))
    model_id = _model_id(ctx)
    publish_segmenter(
        ctx,
        dataset,
        model_id,
        segmenter,
        class_names=class_names,
        axis=encoder.config.axis if config.axis is None else config.axis,
        normalisation=encoder.normalisation,
        encoder_id=encoder_id,
        objective=None if encoder_id is None else encoder.objective,
        method=method,
        config=config,
        pairs=pairs,
        fit_loss=losses.last,
    )
    ctx.progress(Progress(1, 1, losses.last or 0.0, 0.0, "export"))
    return {"segmenter_id": model_id}


def publish_segmenter(
    ctx: JobContext,
    dataset: Dataset,
    model_id: str,
    segmenter: SegmenterNet,
    *,
    class_names: dict[int, str],
    axis: int,
    normalisation: Normalisation,
    encoder_id: str | None,
    objective: str | None,
    method: str,
    config: FewShotConfig,
    pairs: list[tuple[Image, Label]],
    fit_loss: float | None,
    refines: str | None = None,
) -> None:
    """Export ``segmenter`` to ONNX in ``models/<model_id>/`` (atomically) and register it.

    ``refines``: the segmenter of the assist a refinement replaced on the images it refined
    (``lineage["refines"]``; the MONAI Label app serves that one on every other image).
    """
    lineage = {
        "dataset_id": dataset.id,
        "encoder_id": encoder_id,
        "label_ids": [label.id for _, label in pairs],
        "image_ids": [image.id for image, _ in pairs],
        "objective": objective,
        "method": method,
        "config": config.to_dict(),
        "job_id": ctx.job_id,
    } | ({"refines": refines} if refines is not None else {})
    with _publishing(ctx, model_id) as folder:
        manifest = export_segmenter(
            segmenter,
            folder,
            labels=class_names,
            axis=axis,
            normalisation=normalisation,
            objective=objective,
            method=method,
            lineage=lineage,
            metrics={"final_loss": fit_loss},
        )
    metrics = {"final_loss": fit_loss, "parity_max_abs_diff": manifest.parity_max_abs_diff}
    _register(
        ctx,
        ModelRecord(
            id=model_id,
            kind=ModelKind.segmenter,
            dataset_id=dataset.id,
            modality=dataset.modality,
            objective=objective,
            method=method,
            parent_id=encoder_id,
            job_id=ctx.job_id,
            lineage=lineage,
            metrics=metrics,
            folder=str(ctx.storage.model_dir(model_id)),
        ),
    )


def republish_segmenter(ctx: JobContext, source_id: str, model_id: str) -> None:
    """Register ``model_id`` as a copy of the registered segmenter ``source_id``, making an
    earlier answer the dataset's newest segmenter again (a refit that did worse,
    :mod:`segassist.worker.refine`).

    Its files are hard-linked into ``models/<model_id>/`` (copied where the file system refuses
    a link), staged and renamed into place like every export; the record repeats the source's
    with this job's id and ``lineage["restores"] = source_id``.

    Raises:
        LookupError: ``source_id`` is not a registered segmenter.
    """
    with ctx.sessions() as session:
        source = session.get(ModelRecord, source_id)
        if source is None or source.kind != ModelKind.segmenter:
            raise LookupError(f"segmenter {source_id} is not in the model registry")
        folder = Path(source.folder)
        record = ModelRecord(
            id=model_id,
            kind=ModelKind.segmenter,
            dataset_id=source.dataset_id,
            modality=source.modality,
            objective=source.objective,
            method=source.method,
            parent_id=source.parent_id,
            job_id=ctx.job_id,
            lineage=dict(source.lineage or {}) | {"job_id": ctx.job_id, "restores": source_id},
            metrics=dict(source.metrics or {}),
            folder=str(ctx.storage.model_dir(model_id)),
        )
    with _publishing(ctx, model_id) as staging:
        for path in sorted(folder.rglob("*")):
            target = staging / path.relative_to(folder)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            try:
                target.hardlink_to(path)
            except OSError:
                shutil.copy2(path, target)
    _register(ctx, record)


def predict(ctx: JobContext) -> dict[str, Any]:
    """Segment images with a registered segmenter; result ``{"predictions": {image_id: urls}}``.

    Outputs are written by :func:`segassist.server.predictions.predict_to_folder` under
    ``predictions/<model_id>/<image_id>/``, on the input's affine, where the API serves them.
    """
    dataset = _dataset(ctx)
    model_id = str(ctx.params["model_id"])
    with ctx.sessions() as session:
        model = session.get(ModelRecord, model_id)
        if model is None or model.kind != ModelKind.segmenter:
            raise LookupError(f"segmenter {model_id} is not in the model registry")
        _check_modality(model, dataset)
        folder = Path(model.folder)
    predictor = OnnxPredictor.from_folder(folder, device=ctx.settings.device)
    images = _images(ctx, ctx.params.get("image_ids"))
    with_probabilities = bool(ctx.params.get("probabilities", False))
    results: dict[str, Any] = {}
    began = time.monotonic()
    for done, image in enumerate(images, start=1):
        ctx.check_cancelled()
        path = _existing_file(Path(image.path), f"image {image.id} ({image.name})")
        out_dir = ctx.storage.prediction_dir(model_id, image.id)
        names = predict_to_folder(predictor, path, out_dir, with_probabilities)
        results[image.id] = prediction_urls(model_id, image.id, names)
        logger.info("predicted image %s with %s into %s", image.id, model_id, out_dir)
        eta = (time.monotonic() - began) / done * (len(images) - done)
        ctx.progress(Progress(done, len(images), 0.0, eta, "predict"))
    return {"predictions": results}


class _LossTracker:
    """Forwards progress to the job and remembers the last loss (a model metric)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.last: float | None = None

    def __call__(self, progress: Progress) -> None:
        if math.isfinite(progress.loss):
            self.last = float(progress.loss)
        self.ctx.progress(progress)


def _torch_device(ctx: JobContext) -> str:
    wanted = ctx.settings.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _dataset(ctx: JobContext) -> Dataset:
    with ctx.sessions() as session:
        dataset = session.get(Dataset, ctx.dataset_id)
        if dataset is None:
            raise LookupError(f"dataset {ctx.dataset_id} no longer exists")
        return dataset


def _images(ctx: JobContext, image_ids: list[str] | None) -> list[Image]:
    """The dataset's images (all, or ``image_ids`` in that order)."""
    with ctx.sessions() as session:
        query = select(Image).where(Image.dataset_id == ctx.dataset_id)
        if image_ids is not None:
            query = query.where(Image.id.in_(image_ids))
        found = {image.id: image for image in session.scalars(query.order_by(Image.created_at))}
    if image_ids is None:
        images = list(found.values())
    else:
        missing = [i for i in image_ids if i not in found]
        if missing:
            raise LookupError(f"images {missing} are not in dataset {ctx.dataset_id}")
        images = [found[i] for i in image_ids]
    if not images:
        raise LookupError(f"dataset {ctx.dataset_id} has no images")
    return images


def _labelled_images(ctx: JobContext, label_ids: list[str] | None) -> list[tuple[Image, Label]]:
    """(image, label) pairs: the given label versions, or every image's ``final`` label."""
    with ctx.sessions() as session:
        query = select(Image, Label).join(Label).where(Image.dataset_id == ctx.dataset_id)
        if label_ids is None:
            query = query.where(Label.tag == FINAL_TAG)
        else:
            query = query.where(Label.id.in_(label_ids))
        rows = [
            (image, label) for image, label in session.execute(query.order_by(Image.created_at))
        ]
    if label_ids is not None:
        found = {label.id for _, label in rows}
        missing = [i for i in label_ids if i not in found]
        if missing:
            raise LookupError(f"labels {missing} are not in dataset {ctx.dataset_id}")
    if not rows:
        raise LookupError(
            f"dataset {ctx.dataset_id} has no '{FINAL_TAG}' labels: upload a label volume first"
        )
    return rows


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {path} is missing from the datastore")
    return path


def _read_image(image: Image) -> np.ndarray:
    path = _existing_file(Path(image.path), f"image {image.id} ({image.name})")
    volume, _, _ = read_nifti(path)
    if volume.ndim != 3:
        raise ValueError(f"image {image.id} ({image.name}) is not 3D: shape {volume.shape}")
    return np.asarray(volume, dtype=np.float32)


def _read_label(label: Label, image: Image) -> np.ndarray:
    path = _existing_file(Path(label.path), f"label {label.id} of image {image.id}")
    volume, _, _ = read_nifti(path)
    if tuple(volume.shape) != tuple(image.shape):
        raise ValueError(
            f"label {label.id} has shape {tuple(volume.shape)}, image {image.id} {tuple(image.shape)}"
        )
    return np.asarray(volume, dtype=np.uint8)


def _class_names(dataset: Dataset) -> dict[int, str]:
    """Class index → name, 0 = background, up to the schema's largest class."""
    schema = {int(k): v for k, v in (dataset.labels or {}).items()}
    count = max(schema, default=0) + 1
    names = {0: "background"}
    for k in range(1, count):
        entry = schema.get(k)
        names[k] = str(entry.get("name", f"class {k}")) if isinstance(entry, dict) else f"class {k}"
    return names


def _check_modality(model: ModelRecord, dataset: Dataset) -> None:
    if model.modality.lower() != dataset.modality.lower():
        raise ValueError(
            f"{model.kind} {model.id} was trained on {model.modality} images but dataset "
            f"{dataset.id} is {dataset.modality}: use a model of the same modality"
        )


def _encoder(
    ctx: JobContext, dataset: Dataset, encoder_id: str | None, random_config: dict[str, Any]
) -> Encoder:
    """The registered encoder ``encoder_id`` (same modality), or a random one."""
    if encoder_id is None:
        config = PretrainConfig.from_dict({**random_config, "modality": dataset.modality})
        return Encoder.random(config, default_normalisation(dataset.modality))
    with ctx.sessions() as session:
        record = session.get(ModelRecord, encoder_id)
        if record is None or record.kind != ModelKind.encoder:
            raise LookupError(f"encoder {encoder_id} is not in the model registry")
        _check_modality(record, dataset)
        folder = Path(record.folder)
    return Encoder.load(_existing_file(folder / ENCODER_FILE, f"encoder {encoder_id}"))


def _model_id(ctx: JobContext) -> str:
    """The id of the model a job registers: stable across the job's attempts."""
    return uuid.uuid5(_MODEL_NAMESPACE, ctx.job_id).hex


def _registered(ctx: JobContext) -> str | None:
    """The model this job already registered (a previous attempt died before finishing)."""
    with ctx.sessions() as session:
        model_id = session.scalar(select(ModelRecord.id).where(ModelRecord.job_id == ctx.job_id))
    if model_id is not None:
        logger.info("job %s already registered model %s", ctx.job_id, model_id)
    return model_id


@contextmanager
def _publishing(ctx: JobContext, model_id: str) -> Iterator[Path]:
    """A fresh hidden folder to write artifacts into, renamed to ``models/<model_id>`` on success.

    A folder left at the destination by an earlier attempt of the same job is replaced.
    """
    final = ctx.storage.model_dir(model_id)
    with atomic_dir(final) as staging:
        yield staging
    logger.info("published model artifacts in %s", final)


def _register(ctx: JobContext, record: ModelRecord) -> None:
    with ctx.owned_session() as session:
        session.add(record)
    logger.info("registered %s %s", record.kind, record.id)
